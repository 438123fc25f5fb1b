"""The embedded query router: legacy and production load balancers behind one facade.

Knows nothing of Prefect, Great Expectations or the metrics database: it routes,
records rows to segment files and applies `RouterConfig` documents from a control store.
"""

from router.backends import BackendConfig, BackendKind, CostModel
from router.control_store import Acknowledgement, ControlStore, FileControlStore
from router.feature_flags import ProductionFeatureFlags, load_flags
from router.legacy_config import LoadBalancingConfig
from router.legacy_router import IntelligentQueryRouter
from router.migration import ConfigurationMigrator, MigrationReport
from router.modes import Arm, DeploymentMode
from router.production_config import ProductionLoadBalancingConfig
from router.production_router import ProductionIntelligentQueryRouter
from router.result import RoutingResult
from router.router_config import GuardLimits, RouterConfig
from router.settings_errors import SettingsError

__all__ = [
    "Acknowledgement",
    "Arm",
    "BackendConfig",
    "BackendKind",
    "ConfigurationMigrator",
    "ControlStore",
    "CostModel",
    "DeploymentMode",
    "FileControlStore",
    "GuardLimits",
    "IntelligentQueryRouter",
    "LoadBalancingConfig",
    "MigrationReport",
    "ProductionFeatureFlags",
    "ProductionIntelligentQueryRouter",
    "ProductionLoadBalancingConfig",
    "RouterConfig",
    "RoutingResult",
    "SettingsError",
    "load_flags",
]
