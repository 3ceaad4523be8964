"""The learning benchmarks' shared runner: worker processes share specs by claim files."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

from ._procs import REPO

sys.path.insert(0, str(REPO / "bench"))
import runs  # noqa: E402  (bench/ is a folder of scripts, not a package)


def test_a_spec_is_claimed_once_and_a_dead_claim_is_taken_over(tmp_path):
    assert runs.claim(tmp_path, "a")
    assert not runs.claim(tmp_path, "a")  # this process holds it
    (tmp_path / "b.json").write_text("{}")
    assert not runs.claim(tmp_path, "b")  # done
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "c.claim").write_text(f"{platform.node()} {gone.pid}")
    assert runs.claim(tmp_path, "c")  # its claimer has ended
    (tmp_path / "d.claim").write_text(f"another-machine {gone.pid}")
    assert not runs.claim(tmp_path, "d")  # cannot tell: left to the other machine


def test_workers_share_the_specs_and_each_runs_once(tmp_path):
    """Two workers over the same specs: every spec runs exactly once, none is left claimed."""
    script = tmp_path / "bench_toy.py"
    script.write_text(
        f"import sys, os, time, json\nsys.path.insert(0, {str(REPO / 'bench')!r})\n"
        "import runs\n"
        "def specs(seeds, rounds):\n"
        "    return [runs.spec('v', f'o{i}', 'd3po', 0, rounds=rounds) for i in range(6)]\n"
        "def runner(s, out, model):\n"
        "    path = out / f\"{s['id']}.json\"\n"
        "    if path.exists():\n"
        "        return json.loads(path.read_text())\n"
        "    (out / f'worker-{os.getpid()}').touch()\n"
        "    deadline = time.time() + 120\n"  # each worker's first spec waits for the other's
        "    while len(list(out.glob('worker-*'))) < 2 and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    with open(out / 'ran.log', 'a') as f:\n"
        "        f.write(s['id'] + ' ' + str(os.getpid()) + '\\n')\n"
        "    result = {'id': s['id']}\n"
        "    runs.save_result(path, result)\n"
        "    return result\n"
        "def report(results, plot):\n"
        "    print('results', len(results))\n"
        "runs.main('toy', specs, report, seeds=1, plot='x.png', runner=runner,\n"
        "          describe=lambda r: r['id'])\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), "--jobs", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "results 6" in proc.stdout
    ran = (out / "ran.log").read_text().split("\n")[:-1]
    ids = sorted(line.split()[0] for line in ran)
    assert ids == sorted(f"v--o{i}--s0" for i in range(6))  # each once
    assert len({line.split()[1] for line in ran}) == 2  # by both workers
    assert not list(out.glob("*.claim"))
    assert json.loads((out / "v--o0--s0.json").read_text()) == {"id": "v--o0--s0"}
