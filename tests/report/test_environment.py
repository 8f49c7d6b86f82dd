"""The report's provenance lines say when its records come from several machines (a sweep resumed
elsewhere with --reuse-foreign), whose speeds and memory its summary then averages."""

import pandas as pd

from peftlab.report.sweep_report import environment


def frame(devices, machines):
    return pd.DataFrame({"device": devices, "machine.id": machines, "version.torch": ["2.13.0"] * len(devices)})


def test_one_machine_says_nothing_more_even_with_cells_given_a_share_of_its_threads():
    text = environment(frame(["Xeon (2 cores, 2 threads)", "Xeon (2 cores, 1 threads)"], ["a", "a"]))
    assert "machines" not in text


def test_records_from_two_machines_are_said_to_mix_speeds():
    text = environment(frame(["Xeon (2 cores, 2 threads)", "EPYC (2 cores, 2 threads)"], ["a", "b"]))
    assert "made on 2 machines" in text and "speed and memory" in text
    # the same CPU model on two hosts is two machines too
    assert "made on 2 machines" in environment(frame(["Xeon (2 cores, 2 threads)"] * 2, ["a", "b"]))
