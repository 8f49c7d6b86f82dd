"""Prints, after the benchmarks, each group's peftlab-vs-peer ratio and GB/s of fp32 input."""

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
    tr.write_line(f"{'group':44} {'peftlab ms':>11} {'peer ms':>9} {'ratio':>6} {'GB/s':>7} {'of copy':>8}")
    for group, impls in sorted(groups.items()):
        ours, peer = impls.get("peftlab"), impls.get("bitsandbytes")
        if ours is None:
            continue
        gbps = ours.extra_info.get("bytes", 0) / ours.stats.median / 1e9
        ratio = f"{peer.stats.median / ours.stats.median:6.2f}" if peer else "     -"
        peer_ms = f"{peer.stats.median * 1e3:9.2f}" if peer else "        -"
        frac = f"{gbps / ceiling:7.1%}" if ceiling and gbps else "       -"
        tr.write_line(f"{group:44} {ours.stats.median * 1e3:11.2f} {peer_ms} {ratio} {gbps:7.2f} {frac}")
    if ceiling:
        tr.write_line(f"copy ceiling (torch copy_ into a reused buffer): {ceiling:.1f} GB/s")


@pytest.fixture
def info(benchmark):
    def set_(impl: str, nbytes: int) -> None:
        benchmark.extra_info.update(impl=impl, bytes=nbytes)

    return set_
