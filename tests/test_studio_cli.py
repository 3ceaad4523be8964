"""``python -m studio`` arguments: loopback by default, no open bind without auth."""

from __future__ import annotations

import pytest

from studio.__main__ import parse_args


def test_defaults_bind_loopback_without_share():
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.auth is None


def test_non_loopback_host_without_auth_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--host", "0.0.0.0"])
    assert exit_.value.code == 2
    assert "refusing to serve on 0.0.0.0 without --auth" in capsys.readouterr().err


def test_non_loopback_host_with_auth_is_allowed():
    args = parse_args(["--host", "0.0.0.0", "--auth", "ana:secret"])
    assert args.auth == "ana:secret"


def test_auth_needs_user_and_password(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--auth", "justaname"])
    assert "USER:PASS" in capsys.readouterr().err


def test_a_model_that_cannot_load_is_one_line_and_exit_code_2(tmp_path, capsys):
    from studio.__main__ import main

    code = main(["--model", str(tmp_path / "no-model"), "--session", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: model folder not found") and "Traceback" not in err


def test_a_busy_port_says_which_flag_to_use(tmp_path, capsys):
    import socket

    from studio.__main__ import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--port", str(port), "--session", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: port {port} is in use")
    assert f"--port {port + 1}" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()  # it stopped before opening anything


def test_a_port_just_closed_by_a_studio_is_free_again():
    """A connection the server closed leaves the port in TIME_WAIT for a minute; the server
    binds it all the same (SO_REUSEADDR), so the check must not call it busy."""
    import socket

    from studio.__main__ import port_in_use

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server's side closes first: its end waits in TIME_WAIT
        client.close()
        assert port_in_use("127.0.0.1", port) is not None  # still listening
    assert port_in_use("127.0.0.1", port) is None


def test_the_app_reports_nothing_home(ctl):
    from studio.app import build_app

    app = build_app(ctl)
    assert app.analytics_enabled is False and app.config["analytics_enabled"] is False


def test_the_studio_asks_nothing_of_the_network(tmp_path):
    """With the network blocked (every non-loopback connection and name lookup refused and
    logged), the studio starts, serves its page and loads the model: nothing was asked."""
    import subprocess
    import sys
    import urllib.request

    from .conftest import REPO, free_port, repo_env

    log = tmp_path / "network.log"
    env = repo_env(network_log=log)
    port = free_port()
    cmd = [sys.executable, "-m", "studio", "--session", str(tmp_path / "s"), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        lines = [proc.stdout.readline()]
        assert "ready at" in lines[0], lines
        for route in ("/", "/config", "/gradio_api/info"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=30) as page:
                assert page.status == 200
        lines.append(proc.stdout.readline())  # the model loads 3 s after the page with no browser
        assert lines[1].startswith("Model loaded"), lines
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not log.exists(), log.read_text()
