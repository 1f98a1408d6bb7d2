"""timetravel_api: point-in-time feature reconstruction, the query API and the SDK."""

from ._engine import Engine, FeatureResult
from ._training import build_training_set

__all__: list[str] = ["Engine", "FeatureResult", "build_training_set"]
