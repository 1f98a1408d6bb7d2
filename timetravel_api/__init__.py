"""timetravel_api: point-in-time feature reconstruction, the query API and the SDK."""

from ._client import ApiRequestError, ApiUnavailable, Client, TrainingSetFailed, is_complete
from ._encoders import Encoder, encoder, facts, snapshot
from ._engine import Engine, FeatureResult
from ._errors import EntityTypeMismatch, InvalidFeature, TimetravelApiError
from ._features import FeatureSpec, parse_features
from ._parity import ParityReport, log_served_features, parity_report, served_features_type
from ._repo import FeatureRepo
from ._training import build_training_set
from ._view import Batch, View

__all__: list[str] = ["Engine", "FeatureResult", "build_training_set"]
__all__ += [  # feature repo, encoders and parity
    "Batch",
    "Encoder",
    "FeatureRepo",
    "ParityReport",
    "View",
    "encoder",
    "facts",
    "log_served_features",
    "parity_report",
    "served_features_type",
    "snapshot",
]
__all__ += [  # the SDK
    "ApiRequestError",
    "ApiUnavailable",
    "Client",
    "TrainingSetFailed",
    "is_complete",
]
__all__ += [  # feature names and errors
    "EntityTypeMismatch",
    "FeatureSpec",
    "InvalidFeature",
    "TimetravelApiError",
    "parse_features",
]
