"""The demo harness: an application process with a load generator, process management,
and the `rollout demo` runner that ties fleet, app and rollout flow together."""
