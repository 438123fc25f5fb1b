"""`rollout dashboard`: a live, read-only web view of the active rollout.

`view` reads one snapshot from the metrics database and the control store, `page`
renders it as HTML, `server` serves it on loopback and refreshes it in the browser.
"""
