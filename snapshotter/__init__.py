"""snapshotter: stratified context selection and scheduled snapshots of microservice state."""

__all__: list[str] = []
