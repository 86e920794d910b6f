"""Aggregation strategies: pure numpy, no MQTT, no TensorFlow.

A strategy is one pipeline — validate -> weight -> clip -> reduce -> noise -> server optimizer —
and every named method (simple mean, weighted, quality-weighted, FedAvg, FedAvgM, FedAdam,
FedYogi, FedAdagrad, median, trimmed mean, Krum, multi-Krum, hybrids) is a configuration of it.
See docs/strategies.md for formulas and sources.
"""

from .base import ClientUpdate, RoundResult, Strategy
from .registry import PRESETS, build_strategy

__all__ = ["ClientUpdate", "RoundResult", "Strategy", "PRESETS", "build_strategy"]
