"""The simulated world: microservices with time-varying state, the compute app, and the demo.

It may use every product package; no product package imports it.
"""

__all__: list[str] = []
