"""The tests' own servers get ports that cannot clash, and a Ray head that dies of a clash starts again."""

import os
import signal

import helpers
from ports import free_ports


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:4]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_head_that_dies_of_a_port_clash_starts_again_with_new_ports(tmp_path, monkeypatch):
    """The clash seen in a fresh clone (GCS and dashboard agent on one port), forced on the first attempt."""
    real, calls = helpers.ray_port_args, []

    def clashing_once(*, head=True):
        args, ports = real(head=head)
        calls.append(ports)
        if len(calls) == 1:  # the GCS port handed out twice
            ports["dashboard-agent-listen-port"] = ports["port"]
            args = [f"--{flag}={port}" for flag, port in ports.items()]
        return args, ports

    monkeypatch.setattr(helpers, "ray_port_args", clashing_once)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="")
    with open(tmp_path / "head.log", "w") as log:
        head, address, dash = helpers.start_ray_head(log, env, num_cpus=1, timeout=180)
        try:
            assert len(calls) == 2 and address == f"127.0.0.1:{calls[1]['port']}" and dash == calls[1]["dashboard-port"]
            assert helpers.PORT_CLASH in (tmp_path / "head.log").read_text()
        finally:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=60)


def test_the_error_names_the_head_log_line():
    log = "started\n2026 ERROR services.py: Ray component gcs_server is trying to use a port number 1 ...\nbye\n"
    assert helpers.head_log_line(log).startswith("2026 ERROR services.py: Ray component gcs_server")
    assert helpers.head_log_line("only this\n") == "only this"
