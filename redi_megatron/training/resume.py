"""What a resumed run may change: settings that do not alter the trajectory are applied (and said so);
anything else is refused naming the key, never silently recorded but ignored (a resumed run restores
the optimizer, the lr schedule and the data position from the checkpoint, so a new ``optimizer.lr`` or
``train.max_steps`` could not take effect as the user expects)."""
from __future__ import annotations

from typing import Any

from redi_megatron.errors import UserError

# Dotted keys (or prefixes ending in ".") that may differ from the checkpoint's run config.
MAY_CHANGE = ("name", "logging.", "parallel.", "checkpoint.save_dir", "checkpoint.save_interval",
              "checkpoint.keep_last", "checkpoint.resume", "checkpoint.on_corrupt", "checkpoint.trust_unverified",
              "checkpoint.init_from", "data.num_proc", "data.cache_dir", "data.micro_batch_tokens", "data.tokenizer",
              "data.train_path", "train.recompute", "train.on_nonfinite", "train.max_skipped_steps")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def check_resume_config(saved: dict, now: dict, step_dir: str) -> list[str]:
    """Compare the resumed checkpoint's resolved config with this run's. Returns the changed settings
    that are applied (``"key: old -> new"``); raises UserError naming every other changed key."""
    old, new = _flat(saved), _flat(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = [k for k in changed if not _may_change(k)]
    if refused:
        details = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in refused)
        raise UserError(f"resuming from {step_dir}: {details} changed; a resumed run continues the saved one "
                        "exactly (optimizer, lr schedule and data order come from the checkpoint). Restore "
                        "the setting, or start a new run from it with checkpoint.init_from=<that checkpoint> "
                        "and another checkpoint.save_dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
