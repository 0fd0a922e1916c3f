"""The simulated driver: latencies and faults, for scheduling tests, benchmarks and tuning."""

from .driver import FaultRule, Latency, SimVMMS, SimWorld

__all__ = ["FaultRule", "Latency", "SimVMMS", "SimWorld"]
