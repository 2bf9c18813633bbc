"""`openk2 chat` (terminal chat) and `openk2 serve` (a real subprocess)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from openk2.cli import app
from openk2.cli.serve import run_chat_repl
from openk2.serve.server import build_service
from openk2.serve.testing import SYSTEM, serve_subprocess


def test_chat_command_streams_and_resets(model_dir):
    script = "Hello\n/reset\nHello\n/exit\n"
    r = CliRunner().invoke(app, ["chat", str(model_dir), "--system", SYSTEM, "--temperature", "0",
                                 "--max-tokens", "8", "--threads", "1", "--device", "cpu"], input=script)
    assert r.exit_code == 0, r.output
    assert r.output.count("assistant> Hi there!\n") == 2
    assert "(dialog reset)" in r.output


def _reader(lines):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


class _Out:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> None:
        self.parts.append(s)

    def flush(self) -> None:
        pass


def test_chat_repl_multiline_reset_and_system(bundle):
    service = build_service(bundle, max_batch=1, max_len=512)
    kw = dict(temperature=0.0, top_p=1.0, max_tokens=6, seed=None)
    service.start()
    try:
        multi = run_chat_repl(service, system=SYSTEM, read=_reader(["first line\\", "second line"]), out=_Out(), **kw)
        out = _Out()
        dialog = run_chat_repl(service, system=None, out=out, read=_reader(
            ["zzz", "/reset", "/system " + SYSTEM, "Hello", "", "Hello"]), **kw)
    finally:
        service.stop()
    assert multi[1] == {"role": "user", "content": "first line\nsecond line"} and multi[2]["role"] == "assistant"
    assert dialog[0] == {"role": "system", "content": SYSTEM}
    assert [m["content"] for m in dialog[1:]] == ["Hello", "Hi there!", "Hello", "Hi there!"]
    assert "(dialog reset)" in "".join(out.parts) and "(system prompt set; dialog reset)" in "".join(out.parts)


@pytest.mark.slow
def test_serve_command_subprocess(model_dir, tmp_path):
    openai = pytest.importorskip("openai")
    with serve_subprocess(model_dir, "--api-key", "k", "--threads", "1", "--max-batch", "4", "--device", "cpu",
                          log_path=tmp_path / "server.log") as (url, proc):
        with openai.OpenAI(base_url=url, api_key="k", max_retries=0) as client:
            r = client.chat.completions.create(model="toy-k2", messages=[{"role": "system", "content": SYSTEM},
                                                                        {"role": "user", "content": "Hello"}],
                                               temperature=0)
        assert r.choices[0].message.content == "Hi there!"
    assert proc.returncode == 0, (tmp_path / "server.log").read_text()


def test_serve_command_rejects_a_bad_source(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "tokenizer.json" in r.output
