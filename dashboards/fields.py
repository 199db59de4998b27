"""Columns several panels share, with the label a person reads for each.

A panel lists a ``Field`` for every column its SQL returns; the ones only a
single panel uses are written beside it.
"""

from __future__ import annotations

from dashboards.model import Field, Unit

TIME = Field("t", "Time", Unit.TIME)
CUSTOMER = Field("customer", "Customer", Unit.TEXT)
TIER = Field("tier", "Tier", Unit.TEXT)
CURRENT_TIER = Field("current_tier", "Tier", Unit.TEXT)
MODEL = Field("model", "Model", Unit.TEXT)
API_KEY = Field("api_key_id", "API key", Unit.TEXT)
END_USER = Field("end_user", "End user", Unit.TEXT)
PROJECT = Field("project", "Project", Unit.TEXT)
TAG = Field("tag", "Tag", Unit.TEXT)
SPEND = Field("spend_usd", "Spend", Unit.USD)
PERIOD_SPEND = Field("mtd_spend_usd", "Spend this period", Unit.USD)
BUDGET = Field("budget_usd", "Monthly budget", Unit.USD)
BUDGET_USED = Field("budget_used_pct", "Budget used", Unit.PERCENT)
REQUESTS = Field("requests", "Requests served")
REFUSED = Field("refused", "Requests refused")
INPUT_TOKENS = Field("input_tokens", "Input tokens")
OUTPUT_TOKENS = Field("output_tokens", "Output tokens")
PERIOD_TOKENS = Field("mtd_tokens", "Tokens this period")
TOKEN_QUOTA = Field("token_quota", "Monthly token quota")
TOKEN_QUOTA_USED = Field("token_quota_pct", "Token quota used", Unit.PERCENT)
