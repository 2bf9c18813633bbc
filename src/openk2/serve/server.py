"""Running the app: `build_service` (engine + service for a loaded model), `serve` (blocking, for the CLI) and
`ServerThread` (uvicorn in a background thread on a loopback port, for tests, benchmarks and notebooks)."""

from __future__ import annotations

import ipaddress
import threading
import time

import uvicorn

from openk2.model_dir import LoadedModel
from openk2.serve.app import create_app
from openk2.serve.engine import Engine
from openk2.serve.service import OpenAIService


def build_service(bundle: LoadedModel, *, max_batch: int = 16, max_len: int | None = None,
                  prefill_tokens: int = 4096, compile: bool | str = "auto") -> OpenAIService:
    """`compile`: the decode step's switch (`openk2.model.decode`): True, False or "auto"."""
    engine = Engine(bundle.model, max_batch=max_batch, max_len=max_len, prefill_tokens=prefill_tokens,
                    vocab_limit=bundle.tokenizer.vocab_size, compile=compile)
    return OpenAIService(engine, bundle.tokenizer, bundle.name, bundle.chat_format)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(service: OpenAIService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info") -> None:
    """Serve until interrupted (the app's lifespan starts and stops the engine)."""
    # A bounded graceful shutdown: open streams get 10 s to finish before Ctrl-C closes them.
    uvicorn.run(create_app(service, api_key=api_key), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=10)


class ServerThread:
    """`with ServerThread(service) as srv:` serves on 127.0.0.1 at `srv.base_url` (a free port by default)
    until the block ends."""

    def __init__(self, service: OpenAIService, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout: float = 60.0) -> None:
        config = uvicorn.Config(create_app(service, api_key=api_key), host=host, port=port, log_level="warning",
                                lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self.startup_timeout = startup_timeout
        self._thread = threading.Thread(target=self.server.run, name="openk2-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during startup")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server did not start within {self.startup_timeout} s")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
