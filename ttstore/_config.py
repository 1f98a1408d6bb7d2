"""Environment variables, each defined once."""

from __future__ import annotations

#: The store URL when ``--store`` is not given.
ENV_STORE = "TIMETRAVEL_STORE"
#: The feature repo module path when ``--repo`` is not given.
ENV_REPO = "TIMETRAVEL_REPO"
#: The tokens file for the servers when ``--tokens-file`` is not given.
ENV_TOKENS_FILE = "TIMETRAVEL_TOKENS_FILE"
#: The S3 endpoint (a moto server in tests, MinIO, ...). Standard AWS variable.
ENV_AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
#: Objects at least this large are uploaded in parts (bytes); for tests of the multipart path.
ENV_MULTIPART_THRESHOLD = "TIMETRAVEL_MULTIPART_THRESHOLD_BYTES"

DEFAULT_STORE = "./timetravel-data"
