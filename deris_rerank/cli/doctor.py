"""`deris-rerank doctor`: what this machine can run, and which --dtype to use here, from a short measurement."""
from __future__ import annotations

import argparse
from typing import Dict, List

# CPU features that decide the precision modes' speed, as devices.cpu_features() names them
# (torch's names, with /proc/cpuinfo's where they differ)
FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512_f", "avx512f"),
    "AVX-512 VNNI (int8)": ("avx512_vnni",),
    "AVX-VNNI (int8)": ("avx_vnni",),
    "AVX-512 BF16": ("avx512_bf16",),
    "AMX": ("amx_bf16", "amx_tile", "amx_int8"),
}


def feature_line(features) -> str:
    """'AVX2 yes, AVX-512 yes, ...' for the features above; 'unknown' where they cannot be read."""
    if features is None:
        return "unknown (neither torch nor /proc/cpuinfo says)"
    return ", ".join(f"{name} {'yes' if features & set(names) else 'no'}" for name, names in FEATURES.items())


def recommendation(times: Dict[str, float], chosen: str) -> str:
    """The one line to act on, from measured ms per call of each mode and the mode `fastest` chose."""
    if not times:
        return "--dtype float32 (the default; no other mode is offered on this device yet)"
    if chosen == "float32":
        others = ", ".join(f"{m} {times['float32'] / t:.2f}x" for m, t in times.items() if m != "float32")
        return f"--dtype float32 (the default): no other mode is clearly faster here ({others} float32's speed)"
    return (f"--dtype {chosen} ({times['float32'] / times[chosen]:.2f}x float32's speed here; its agreement with float32 "
            "is in docs/speed.md); --dtype auto picks it too")


def mode_lines(modes: List[str]) -> List[str]:
    from ..devices import bfloat16_emulation
    from ..int8 import available_engines

    engines = [e for e in ("x86", "fbgemm") if e in available_engines()]
    emulated = bfloat16_emulation()
    return [
        "float32: yes (the default)",
        f"int8: {'yes, engine ' + engines[0] if engines else 'no: this torch build has no x86/fbgemm quantised kernels'}",
        f"bfloat16: {'native' if emulated is None else 'emulated, 20-30x slower than float32: ' + emulated}",
        "float16: CUDA only",
    ]


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from ..devices import cpu_features, resolve_device
    from ..precision_choice import cache_path, candidate_modes, choose_precision, cpu_name

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels {torch.backends.cpu.get_cpu_capability()}")
    print(f"CPU: {cpu_name()}; {feature_line(cpu_features())}")
    if torch.cuda.is_available():
        print(f"CUDA: {', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))}")
    for line in mode_lines(candidate_modes(device)):
        print(f"  {line}")
    model, name = _model(args)
    print(f"measuring {name} on {device} (one synthetic pair; {', '.join(candidate_modes(device))}) ...", flush=True)
    chosen, times = choose_precision(model.to(device), device, reuse=False)
    if times:
        print("  " + ", ".join(f"{mode} {ms:.0f} ms" for mode, ms in times.items()) + " per pair")
        print(f"  remembered in {cache_path()} for --dtype auto")
    print(f"recommendation: {recommendation(times, chosen)}")
    return 0


def _model(args: argparse.Namespace):
    """(float32 DerisModel, its description): --preset with random weights, else --deris or the default."""
    from ..checkpoints import load_deris
    from ..model_files import default_model, resolve_deris

    if args.preset:
        import torch

        from ..deris.config import DerisConfig
        from ..deris.model import DerisModel

        torch.manual_seed(0)
        return DerisModel(DerisConfig.preset(args.preset)).eval(), f"{args.preset} (random weights)"
    path = resolve_deris(args.deris or default_model())
    model = load_deris(path)
    return model, f"{model.config.name} ({path})"


def add_commands(commands) -> None:
    """Add `doctor` to the `deris-rerank` subcommands."""
    doctor = commands.add_parser(
        "doctor",
        help="say what this machine can run and which --dtype is fastest here (a short measurement)",
        description="Print the CPU's relevant instruction sets, which precision modes run natively, then time one "
                    "synthetic pair in each mode on a model and recommend a --dtype. The measurement is remembered "
                    "for --dtype auto.",
    )
    doctor.add_argument("--deris", help="DeRIS model to measure (default: the embedded default)")
    doctor.add_argument("--preset", help="measure this preset with random weights instead (e.g. deris-l-refcoco)")
    doctor.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    doctor.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    doctor.set_defaults(run=cmd_doctor)
