"""Pure loyalty domain: the program definition, the ledger fold and the decisions. No I/O here."""

from services.profile.loyalty.domain.decide import (
    Adjust,
    CancelOrder,
    Command,
    CompleteOrder,
    IdempotencyConflict,
    InsufficientPoints,
    LoyaltyError,
    NoProgram,
    RecordAction,
    Redeem,
    RefundOrder,
    Tick,
    UnknownReward,
    add_months,
    decide,
    next_review_at,
    qualified_rank,
    qualifying_total,
    replay,
)
from services.profile.loyalty.domain.from_events import LOYALTY_SOURCE, command_for
from services.profile.loyalty.domain.ledger import (
    LEDGER_EVENT_NAMES,
    POINTS_ADJUSTED,
    POINTS_EARNED,
    POINTS_EXPIRED,
    POINTS_REDEEMED,
    TIER_CHANGED,
    Ledger,
    LedgerEvent,
    expiring_summary,
    fold,
    fold_all,
)
from services.profile.loyalty.domain.program import Program, ProgramDefinition, Reward, Tier, effective_program

__all__ = [
    "LEDGER_EVENT_NAMES", "LOYALTY_SOURCE", "POINTS_ADJUSTED", "POINTS_EARNED", "POINTS_EXPIRED", "POINTS_REDEEMED",
    "TIER_CHANGED", "Adjust", "CancelOrder", "Command", "CompleteOrder", "IdempotencyConflict", "InsufficientPoints",
    "Ledger", "LedgerEvent", "LoyaltyError", "NoProgram", "Program", "ProgramDefinition", "RecordAction", "Redeem",
    "RefundOrder", "Reward", "Tick", "Tier", "UnknownReward", "add_months", "command_for", "decide",
    "effective_program", "expiring_summary", "fold", "fold_all", "next_review_at", "qualified_rank",
    "qualifying_total", "replay",
]
