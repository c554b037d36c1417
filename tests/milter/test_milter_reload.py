"""A reload in milter mode is held to what a milter can do: a config asking for one copy per
recipient is refused as a bad file is, and the running config stays."""

from __future__ import annotations

from pathlib import Path

import yaml

from proxy.app import App
from proxy.config.settings import load_config
from proxy.milter.session import milter_config_errors
from tests.milter.harness import milter_config


async def test_a_reload_to_split_is_refused_in_milter_mode(tmp_path: Path) -> None:
    path = tmp_path / "milter.yaml"
    path.write_text(yaml.safe_dump(milter_config(tmp_path)))
    app = App(load_config(path), config_path=str(path), smtp=False)
    app.mode_problems = milter_config_errors
    await app.start()
    try:
        running = app.runtime
        assert app.listeners == {}  # milter mode opens no SMTP listener
        split = milter_config(tmp_path)
        split["policies"].append({"name": "visible_recipients", "remedy": "split"})
        path.write_text(yaml.safe_dump(split))
        assert await app.reload("SIGHUP") is False
        assert app.runtime is running
        failures = app.services.metrics.config_reloads.labels("failure")._value.get()
        assert failures == 1
        # the file itself is valid (serve would take it): it is milter mode that refuses it
        assert milter_config_errors(load_config(path)) != []
        path.write_text(yaml.safe_dump(milter_config(tmp_path, {"policies": [{"name": "required_headers"}]})))
        assert await app.reload("SIGHUP") is True
        assert app.runtime is not running
    finally:
        await app.stop()
