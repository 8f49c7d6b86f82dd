"""Prints, after the benchmarks, each group's peftlab-vs-peer ratio, its throughput (GB/s of fp32
input, or tokens/s) and, where measured, peak memory (over a probe's 4 steps, and over its steps 2-4)."""

import pytest


def pytest_terminal_summary(terminalreporter, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    groups: dict[str, dict[str, object]] = {}
    for b in bs.benchmarks:
        groups.setdefault(b.group or b.name, {})[b.extra_info.get("impl", b.name)] = b
    copy = next((b for b in bs.benchmarks if b.extra_info.get("impl") == "copy"), None)
    ceiling = copy.extra_info["bytes"] / copy.stats.median / 1e9 if copy else None
    tr = terminalreporter
    tr.section("peftlab vs peers (median times; ratio = peer time / peftlab time, >1 means peftlab is faster)")
    tr.write_line(f"{'group':58} {'peftlab ms':>11} {'peer ms':>9} {'ratio':>6} {'throughput':>14} "
                  f"{'peak MB (ours/peer)':>20}")
    for group, impls in sorted(groups.items()):
        ours = impls.get("peftlab")
        peer = next((b for k, b in impls.items() if k not in ("peftlab", "copy")), None)
        if ours is None:
            continue
        ratio = f"{peer.stats.median / ours.stats.median:6.2f}" if peer else "     -"
        peer_ms = f"{peer.stats.median * 1e3:9.2f}" if peer else "        -"
        if "tokens" in ours.extra_info:
            thr = f"{ours.extra_info['tokens'] / ours.stats.median:8.0f} tok/s"
        else:
            gbps = ours.extra_info.get("bytes", 0) / ours.stats.median / 1e9
            frac = f" ({gbps / ceiling:.1%})" if ceiling and gbps else ""
            thr = f"{gbps:.2f} GB/s{frac}"
        mem = "-"
        if "peak_rss" in ours.extra_info:
            theirs = peer.extra_info.get("peak_rss") if peer else None
            mem = f"{ours.extra_info['peak_rss'] / 2**20:.0f}" + (f" / {theirs / 2**20:.0f}" if theirs else "")
            if "peak_rss_steady" in ours.extra_info:  # steps 2-4 alone: after a compiled variant's compile
                theirs = peer.extra_info.get("peak_rss_steady") if peer else None
                mem += (f" (steps 2-4: {ours.extra_info['peak_rss_steady'] / 2**20:.0f}"
                        + (f" / {theirs / 2**20:.0f})" if theirs else ")"))
        tr.write_line(f"{group:58} {ours.stats.median * 1e3:11.2f} {peer_ms} {ratio} {thr:>14} {mem:>20}")
    for b in bs.benchmarks:
        turns = {k[len("in_turn_ratio_"):]: v for k, v in b.extra_info.items() if k.startswith("in_turn_ratio_")}
        if turns:
            tr.write_line(f"{b.group}: ratio " + ", ".join(f"{k} {v:.2f}" for k, v in turns.items()))
    if ceiling:
        tr.write_line(f"copy ceiling (torch copy_ into a reused buffer): {ceiling:.1f} GB/s")


@pytest.fixture
def info(benchmark):
    def set_(impl: str, nbytes: int) -> None:
        benchmark.extra_info.update(impl=impl, bytes=nbytes)

    return set_
