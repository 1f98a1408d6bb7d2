"""timetravel_api: point-in-time feature reconstruction, the query API and the SDK."""

__all__: list[str] = []
