"""The GPU check's table (scripts/gpu_check.py): tokens/s, MFU and peak memory per (method, launch, tool), align's
ratios to TRL at the same launch, and the check that align's FSDP2 run was sharded by align and gave the 1-process
losses."""

from __future__ import annotations

TOOLS = ("trl", "align", "align-pf")  # align-pf: align with padding_free (issue 18), single process only


def figures(r: dict, n_params: int, peak_tflops: float | None) -> dict:
    """tokens/s and MFU of one run's result."""
    tokens_per_s = r["tokens"] / r["s_per_step"]
    flops = 6 * n_params * r["tokens"] + 2 * n_params * r["generated"]
    mfu = flops / r["s_per_step"] / (peak_tflops * 1e12) if peak_tflops else None
    return {"tokens_per_s": tokens_per_s, "mfu": mfu}


def report(results: dict, n_params: int, peak_tflops: float | None, which: list[str]) -> list[str]:
    """The table: one line per (method, launch, tool), align's with its ratios to TRL's at the same launch."""
    lines = [f"{'method':<6} {'launch':<7} {'tool':<8} {'tokens/s':>10} {'s/step':>8} {'MFU':>7} {'peak MiB':>9} "
             f"{'tok/s / TRL':>12} {'peak / TRL':>11}"]
    for method in which:
        for launcher in ("single", "fsdp2"):
            trl = results.get(("trl", launcher), {}).get(method)
            for tool in TOOLS:
                r = results.get((tool, launcher), {}).get(method)
                if r is None:
                    continue
                head = f"{method:<6} {launcher:<7} {tool:<8}"
                if "refused" in r or "failed" in r:
                    what = "refused" if "refused" in r else "FAILED"
                    lines.append(f"{head} {what}: {r.get('refused') or r['failed']}")
                    continue
                f = figures(r, n_params, peak_tflops)
                mfu = f"{100 * f['mfu']:6.2f}%" if f["mfu"] is not None else "    n/a"
                line = f"{head} {f['tokens_per_s']:>10.1f} {r['s_per_step']:>8.3f} {mfu:>7} {r['peak_mib']:>9.0f}"
                if tool != "trl" and trl and "s_per_step" in trl:
                    t = figures(trl, n_params, peak_tflops)
                    speed, memory = f["tokens_per_s"] / t["tokens_per_s"], r["peak_mib"] / trl["peak_mib"]
                    line += f" {speed:>11.2f}x {memory:>10.2f}x"
                lines.append(line)
    return lines


LOSS_TOLERANCE = 0.02  # bf16 autocast: the same kernels on the same weights; the sharded path only adds copies


def consistency(results: dict, which: list[str]) -> tuple[list[str], bool]:
    """align under FSDP2 (one process, sharded by align itself) against align in one process: the launch really
    sharded, and the losses of every step agree to :data:`LOSS_TOLERANCE`. Lines to print, and whether all held."""
    lines, ok = [], True
    for method in which:
        one = results.get(("align", "single"), {}).get(method)
        two = results.get(("align", "fsdp2"), {}).get(method)
        if not one or not two or "losses" not in one or "losses" not in two:
            continue
        gap = max((abs(a - b) for a, b in zip(one["losses"], two["losses"])), default=float("inf"))
        good = two["sharded"] and len(one["losses"]) == len(two["losses"]) and gap <= LOSS_TOLERANCE
        ok &= good
        lines.append(f"{method:<6} align fsdp2 vs single: sharded by align {'yes' if two['sharded'] else 'NO'}, "
                     f"losses {[round(x, 4) for x in two['losses']]} vs {[round(x, 4) for x in one['losses']]}, "
                     f"max |diff| {gap:.2g} ({'ok' if good else 'FAILED'})")
    return lines, ok
