"""``sftjax plan CONFIG [overrides] [--target NAME] [--compile]``: the command line of the planner."""

from __future__ import annotations

import argparse
import json

from sftjax import accelerators
from sftjax.config import load_config
from sftjax.errors import ConfigError
from sftjax.plan.compile import compile_for_target, compile_memory, format_target
from sftjax.plan.estimate import DEVICE_KINDS, plan


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=None,
                        help="number of devices (default: this machine's, or the config's fixed mesh size)")
    parser.add_argument("--device", choices=DEVICE_KINDS, default=None, help="device kind (default: this machine's)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: data.max_length)")
    parser.add_argument("--target", default=None,
                        help="a TPU slice or GPU to plan for: " + ", ".join(accelerators.target_names())
                             + " (sets --device and --devices; with --compile, compiles for it)")
    parser.add_argument("--compile", action="store_true",
                        help="also compile the real train step (for --target, or this machine's devices) and report "
                             "XLA's memory analysis (slow for big models)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (see configs/)")
    # REMAINDER, so that options may follow the overrides; run() separates them again
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="overrides, as for `sftjax train` (e.g. train.mesh.fsdp=4), and options in any order")
    _add_options(parser)


class _OptionParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(f"plan: {message} (see sftjax plan --help)")


def _split_overrides(args: argparse.Namespace) -> argparse.Namespace:
    """Options that came after the config (inside ``overrides``) parsed and merged into ``args``."""
    overrides, options = [], []
    takes_value = False
    for item in args.overrides or []:
        if takes_value or item.startswith("-"):
            options.append(item)
            takes_value = not takes_value and item in _VALUE_OPTIONS
        else:
            overrides.append(item)
    parser = _OptionParser(prog="sftjax plan", add_help=False)
    _add_options(parser)
    parsed = parser.parse_args(options)
    merged = vars(args) | {k: v for k, v in vars(parsed).items() if v != parser.get_default(k)}
    merged["overrides"] = overrides
    return argparse.Namespace(**merged)


_VALUE_OPTIONS = ("--devices", "--device", "--mfu", "--seq-len", "--target")


def run(args: argparse.Namespace) -> int:
    args = _split_overrides(args)
    target = accelerators.lookup_target(args.target) if args.target else None  # unknown names fail first
    cfg = load_config(args.config, overrides=args.overrides)
    devices, device_kind = args.devices, args.device
    if target is not None:
        if args.device or args.devices:
            raise ConfigError("plan: --target sets the device kind and count; drop --device/--devices")
        device_kind = target.chip.name
        if isinstance(target, accelerators.TpuSlice):
            devices = target.num_chips
    result = plan(cfg, devices=devices, device_kind=device_kind, mfu=args.mfu, seq_len=args.seq_len)
    compiled = None
    if args.compile:
        compiled = (compile_for_target(cfg, target.name, seq_len=args.seq_len) if target is not None
                    else compile_memory(cfg, seq_len=args.seq_len))
        result.compiled = compiled
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.format())
        if target is not None and compiled is not None:
            print("\n".join(["", *format_target(compiled)]))
    return 0
