"""Prices and cost arithmetic: what a job will cost before it is sent, and what it cost after.

Defaults are the contract's figures (CNY). EMO's are Alibaba's published prices; Emoji's come from
a reseller's list and are marked unconfirmed. Each can be overridden by an environment variable,
and an override counts as confirmed (the operator vouches for it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from server.errors import ConfigError

# Longest audio EMO accepts: the upper bound when the duration cannot be read.
MAX_AUDIO_SECONDS = 60.0


@dataclass(frozen=True)
class Price:
    cny: float
    confirmed: bool
    variable: str  # the environment variable that overrides it


def _defaults() -> dict[str, Price]:
    return {
        "emo-v1:1:1": Price(0.08, True, "EMO_MCP_PRICE_EMO_1_1"),
        "emo-v1:3:4": Price(0.16, True, "EMO_MCP_PRICE_EMO_3_4"),
        "emoji-v1": Price(0.08, False, "EMO_MCP_PRICE_EMOJI"),
        "emo-detect-v1": Price(0.004, True, "EMO_MCP_PRICE_EMO_DETECT"),
        "emoji-detect-v1": Price(0.004, False, "EMO_MCP_PRICE_EMOJI_DETECT"),
    }


@dataclass(frozen=True)
class PriceTable:
    """CNY per output second for generation (per ratio for emo-v1), per image for detection."""

    prices: Mapping[str, Price] = field(default_factory=_defaults)

    def emo_rate(self, ratio: str) -> Price:
        return self.prices["emo-v1:3:4" if ratio == "3:4" else "emo-v1:1:1"]

    @property
    def emoji_rate(self) -> Price:
        return self.prices["emoji-v1"]

    def detect(self, family: str) -> Price:
        return self.prices["emo-detect-v1" if family == "emo" else "emoji-detect-v1"]


def load_prices(env: Mapping[str, str]) -> PriceTable:
    table: dict[str, Price] = {}
    for key, price in _defaults().items():
        raw = (env.get(price.variable) or "").strip()
        if not raw:
            table[key] = price
            continue
        try:
            value = float(raw)
        except ValueError as exc:
            raise ConfigError(f"{price.variable} must be a price in CNY, got {raw!r}") from exc
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{price.variable} must be a price of 0 CNY or more, got {raw!r}")
        table[key] = Price(value, True, price.variable)
    return PriceTable(table)


def parse_cny(env: Mapping[str, str], name: str) -> float | None:
    """An optional positive CNY amount (a ceiling or threshold); unset means no limit."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an amount in CNY, got {raw!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be an amount of 0 CNY or more, got {raw!r}")
    return value


@dataclass(frozen=True)
class Estimate:
    cny: float
    basis: str  # one line a person can check: seconds × rate, and where the seconds came from
    confirmed: bool  # False when the rate is unconfirmed or the seconds are an upper bound


def _money(value: float) -> float:
    return round(value, 4)


def estimate_emo(prices: PriceTable, ratio: str, audio_seconds: float | None) -> Estimate:
    """Output length equals audio length; unknown audio length is billed at most 60 s."""
    rate = prices.emo_rate(ratio)
    if audio_seconds is None:
        seconds, source = MAX_AUDIO_SECONDS, "upper bound: audio length unknown, EMO accepts at most 60 s"
    else:
        seconds, source = audio_seconds, "audio length read from the file"
    basis = f"{seconds:.2f} s ({source}) x {rate.cny} CNY/s at {ratio}"
    if not rate.confirmed:
        basis += " (price unconfirmed)"
    return Estimate(_money(seconds * rate.cny), basis, rate.confirmed and audio_seconds is not None)


def estimate_emoji(prices: PriceTable, max_seconds: float) -> Estimate:
    """Emoji clips are at most the template's length bound."""
    rate = prices.emoji_rate
    basis = f"{max_seconds:g} s (template length bound) x {rate.cny} CNY/s"
    if not rate.confirmed:
        basis += f" (price unconfirmed; set {rate.variable} to the price on your bill)"
    return Estimate(_money(max_seconds * rate.cny), basis, False)


def actual_cost(prices: PriceTable, family: str, usage: Mapping[str, Any] | None) -> float | None:
    """Cost from the finished task's `usage.video_duration` (the billing base), or None."""
    if not usage:
        return None
    duration = usage.get("video_duration")
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        return None
    if family == "emo":
        ratio = str(usage.get("video_ratio") or "1:1")
        rate = prices.emo_rate(ratio).cny
    else:
        rate = prices.emoji_rate.cny
    return _money(float(duration) * rate)
