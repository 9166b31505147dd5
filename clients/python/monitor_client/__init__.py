"""A client of the monitor agent's control socket, for agent frameworks and CI runners.

The protocol (docs/control-protocol.md) is one JSON request line and one JSON response line
per connection, over a Unix socket only root may use. A session is described as in a session
file (a dict with the same keys: principal, actor, task, sponsor, ttl, grace, scope, tokens,
enforce).

    from monitor_client import Agent

    agent = Agent()                                     # /run/monitor/control.sock
    code = agent.run({"principal": "alice@example.com", "actor": "svc:support-bot",
                      "task": "refund ticket 4711", "scope": {"connect": ["127.0.0.2:8443"]}},
                     ["python3", "refund.py"])

    with agent.session(session, pid=worker.pid) as s:   # bind a running process
        ...
"""

import contextlib
import json
import os
import socket

__all__ = ["Agent", "MonitorError", "DEFAULT_CONTROL_SOCKET"]

DEFAULT_CONTROL_SOCKET = "/run/monitor/control.sock"
# The agent refuses larger requests (MAX_REQUEST_BYTES).
_MAX_REQUEST = 1 << 20


class MonitorError(Exception):
    """The agent refused a request (its message says why), or could not be reached."""


class Agent:
    def __init__(self, control=None, timeout=30.0):
        self.control = control or os.environ.get("MONITOR_CONTROL", DEFAULT_CONTROL_SOCKET)
        self.timeout = timeout

    def call(self, request):
        """Sends one request (a dict with "op"), returns the response's data."""
        line = json.dumps(request).encode() + b"\n"
        if len(line) > _MAX_REQUEST:
            raise MonitorError(f"request of {len(line)} bytes is larger than the agent takes")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.control)
                s.sendall(line)
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    answer += chunk
        except OSError as e:
            raise MonitorError(f"agent at {self.control}: {e}") from e
        if not answer:
            raise MonitorError(f"agent at {self.control} closed the connection without answering")
        response = json.loads(answer)
        if response.get("status") != "ok":
            raise MonitorError(response.get("message", "the agent refused the request"))
        return response.get("data")

    def start(self, session, pid=None, cgroup=None, id=None, env=None, origin="monitor_client"):
        """Declares a session; binds a running process (and its descendants) or a cgroup v2.

        Tokens declared as `{"env": NAME}` are read from `env` (default: this process's
        environment), as `monitor session start` reads them from its own. Returns
        {"id": the session's id, "key": the agent's number for it}.
        """
        environment = os.environ if env is None else env
        env_tokens = [environment.get(t["env"]) for t in session.get("tokens", []) if "env" in t]
        request = {
            "op": "start",
            "origin": origin,
            "file": session,
            "id": id,
            "bind": {"pid": pid, "cgroup": cgroup},
            "env_tokens": env_tokens,
        }
        return self.call(request)

    def end(self, id):
        """Ends a session: the task is done. Returns its summary."""
        return self.call({"op": "end", "id": id})

    def list(self):
        return self.call({"op": "list"})

    def show(self, id):
        return self.call({"op": "show", "id": id})

    def probes(self):
        return self.call({"op": "probes"})

    def reload_policy(self):
        return self.call({"op": "reload_policy"})["message"]

    @contextlib.contextmanager
    def session(self, session, pid=None, cgroup=None, id=None, env=None):
        """A session for the duration of a `with` block, ended when it exits (even on error)."""
        started = self.start(session, pid=pid, cgroup=cgroup, id=id, env=env)
        session_id = started["id"]
        try:
            yield started
        finally:
            self.end(session_id)

    def run(self, session, argv, env=None, id=None):
        """Runs `argv` as a session's task, as `monitor run` does: the child is bound before it
        execs, so its first instruction is already the session's; the session ends when it
        exits. Returns its exit code (128+signal when killed)."""
        environment = dict(os.environ if env is None else env)
        go_read, go_write = os.pipe()
        child = os.fork()
        if child == 0:
            # The child: wait for the go-ahead (the agent has bound our pid), then exec.
            try:
                os.close(go_write)
                ok = os.read(go_read, 1)
                if ok != b"1":
                    os._exit(125)
                os.execvpe(argv[0], argv, environment)
            except BaseException:
                os._exit(127)
        os.close(go_read)
        try:
            started = self.start(session, pid=child, id=id, env=environment)
        except BaseException:
            os.close(go_write)
            os.waitpid(child, 0)
            raise
        os.write(go_write, b"1")
        os.close(go_write)
        _, status = os.waitpid(child, 0)
        try:
            self.call({"op": "end", "id": started["id"], "reason": "root_exited"})
        except MonitorError:
            pass
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)
        return os.WEXITSTATUS(status)
