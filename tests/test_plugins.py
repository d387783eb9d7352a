"""Plugin loading: built-ins come through the same hook as everyone else's; local files,
entry points and PEFTGEN_* variables work; broken plugins are named, not fatal."""

from __future__ import annotations

import importlib.metadata
import textwrap
import warnings

import pytest
import torch

from peftgen import SequenceDecoder, TokenDecoder, hookimpl, plugins
from peftgen.errors import PeftgenError
from peftgen.generation.decoder import Completion
from peftgen.testing import isolated_plugins

BUILTINS = {"greedy": "peftgen.decoders.greedy", "topk": "peftgen.decoders.topk", "topp": "peftgen.decoders.topp", "beam": "peftgen.decoders.beam"}


class Last(TokenDecoder):
    """Always the last token of the vocabulary."""

    name = "last"

    def select(self, logits, ctx):
        return torch.full(logits.shape[:1], logits.shape[-1] - 1, dtype=torch.long)


class LastPlugin:
    @hookimpl
    def register_decoders(self, register):
        register(Last)


def test_builtins_are_plugins_registered_by_the_same_call():
    with isolated_plugins() as pm:
        decoders = plugins.get_decoders()
        assert {name: info.plugin for name, info in decoders.items() if info.source == "built-in"} == BUILTINS
        for module in BUILTINS.values():
            assert pm.get_plugin(module).__name__ == module  # the module itself, as a user's plugin is


def test_an_inline_plugin_is_found_and_forgotten_when_unregistered():
    with isolated_plugins() as pm:
        pm.register(LastPlugin(), name="last-plugin")
        try:
            info = plugins.get_decoder("last")
            assert (info.cls, info.plugin) == (Last, "last-plugin")
        finally:
            pm.unregister(name="last-plugin")
        assert "last" not in plugins.get_decoders()


def test_two_decoders_with_one_name_is_an_error_naming_both_plugins():
    class Impostor(TokenDecoder):
        """Another topk."""

        name = "topk"

    class ImpostorPlugin:
        @hookimpl
        def register_decoders(self, register):
            register(Impostor)

    with isolated_plugins() as pm:
        pm.register(ImpostorPlugin(), name="impostor")
        with pytest.raises(PeftgenError) as error:
            plugins.get_decoders()
    assert str(error.value) == (
        "Decoder name 'topk' is registered twice: by plugin 'peftgen.decoders.topk' and by plugin 'impostor'. "
        "Uninstall one, or block one with PEFTGEN_DISABLE_PLUGINS=impostor."
    )


def test_unknown_decoder_lists_the_available_ones(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "minp")  # the example plugin, when installed
    with isolated_plugins(), pytest.raises(PeftgenError) as error:
        plugins.get_decoder("topkk")
    assert str(error.value) == ("Unknown decoder 'topkk'. Available: beam, greedy, topk, topp (installed plugins add more; see 'peftgen decoders').")


def write_plugin(folder, name, body) -> str:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


LOCAL = """
    import torch
    from peftgen import TokenDecoder, hookimpl

    class First(TokenDecoder):
        '''Always token 0.'''
        name = "first"

        def select(self, logits, ctx):
            return torch.zeros(logits.shape[0], dtype=torch.long)

    @hookimpl
    def register_decoders(register):
        register(First)
"""


def test_a_local_file_loads_with_plugin_and_with_the_environment(tmp_path, monkeypatch):
    path = write_plugin(tmp_path, "first_decoder", LOCAL)
    with isolated_plugins():
        plugins.load_plugins([path])
        assert plugins.get_decoder("first").source == "local"
    monkeypatch.setenv("PEFTGEN_PLUGINS", path)
    with isolated_plugins():
        assert plugins.get_decoder("first").plugin == path


def test_an_importable_module_loads_by_name(tmp_path, monkeypatch):
    write_plugin(tmp_path, "first_by_name", LOCAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    with isolated_plugins():
        plugins.load_plugins(["first_by_name"])
        found = plugins.get_decoder("first")
        assert (found.plugin, found.source) == ("first_by_name", "local")


def test_a_plugin_that_fails_to_import_is_a_warning_and_the_others_still_work(tmp_path):
    path = write_plugin(tmp_path, "broken_decoder", "import no_such_module_at_all\n")
    with isolated_plugins(), pytest.warns(plugins.PluginWarning, match=r"Plugin '.*broken_decoder.py' failed to load and is skipped: ModuleNotFoundError"):
        plugins.load_plugins([path])
        assert set(BUILTINS) <= set(plugins.get_decoders())


def test_a_broken_installed_entry_point_is_a_warning_naming_it(monkeypatch):
    class Distribution:
        metadata = {"Name": "peftgen-broken"}
        version = "9.9"
        entry_points = [importlib.metadata.EntryPoint(name="broken", value="no_such_module_xyz", group="peftgen")]

    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [*real(), Distribution()])
    with pytest.warns(plugins.PluginWarning, match="Plugin 'broken' failed to load and is skipped"):
        with isolated_plugins():
            assert set(BUILTINS) <= set(plugins.get_decoders())


def test_a_missing_plugin_file_or_module_is_an_error():
    with isolated_plugins():
        with pytest.raises(PeftgenError, match=r"^Plugin file not found: nowhere/x.py. Pass an existing .py file"):
            plugins.load_plugins(["nowhere/x.py"])
        with pytest.raises(PeftgenError, match=r"^Plugin module 'no_such_module_xyz' is not importable"):
            plugins.load_plugins(["no_such_module_xyz"])


def test_disabled_plugins_are_blocked(monkeypatch):
    monkeypatch.setenv("PEFTGEN_DISABLE_PLUGINS", "peftgen.decoders.beam, peftgen.decoders.topp")
    with isolated_plugins():
        assert set(plugins.get_decoders()) >= {"greedy", "topk"}
        assert not {"beam", "topp"} & set(plugins.get_decoders())


def test_a_hook_with_a_misspelled_name_is_an_error_naming_the_plugin():
    class Typo:
        @hookimpl
        def register_decoder(self, register):  # missing s
            pass

    with isolated_plugins() as pm:
        pm.register(Typo(), name="typo")
        with pytest.raises(PeftgenError, match=r"^Plugin 'typo' has a hook peftgen does not define: .*register_decoder.*peftgen's hooks: register_decoders\."):
            plugins.check_pending()


def test_registering_something_that_is_not_a_decoder_is_an_error():
    class Bad:
        @hookimpl
        def register_decoders(self, register):
            register(dict)

    with isolated_plugins() as pm:
        pm.register(Bad(), name="bad")
        with pytest.raises(PeftgenError, match=r"^Plugin 'bad' registered <class 'dict'>, which is not a TokenDecoder or SequenceDecoder"):
            plugins.get_decoders()


def test_a_plugin_whose_hook_raises_is_skipped_with_a_warning():
    class Crashing:
        @hookimpl
        def register_decoders(self, register):
            raise RuntimeError("no GPU here")

    with isolated_plugins() as pm:
        pm.register(Crashing(), name="crashing")
        with pytest.warns(plugins.PluginWarning, match=r"Plugin 'crashing' failed in register_decoders and is skipped: RuntimeError: no GPU here"):
            assert set(BUILTINS) <= set(plugins.get_decoders())


def test_load_plugins_is_idempotent():
    with isolated_plugins() as pm:
        count = len(pm.get_plugins())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plugins.load_plugins()
            plugins.load_plugins()
        assert len(pm.get_plugins()) == count


def test_importing_peftgen_does_not_import_torch():
    import subprocess
    import sys

    code = "import peftgen, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# Misbehaving decoders: each gets one clear error naming it, at whatever step -----


def test_a_plugin_calling_sys_exit_at_import_is_a_warning_not_the_end(tmp_path):
    path = write_plugin(tmp_path, "exiting_decoder", "import sys\nsys.exit(3)\n")
    with isolated_plugins(), pytest.warns(plugins.PluginWarning, match=r"Plugin '.*exiting_decoder.py' failed to load and is skipped: SystemExit: 3"):
        plugins.load_plugins([path])
        assert set(BUILTINS) <= set(plugins.get_decoders())


def test_a_plugin_calling_sys_exit_in_its_hook_is_a_warning():
    class Exiting:
        @hookimpl
        def register_decoders(self, register):
            raise SystemExit("bye")

    with isolated_plugins() as pm:
        pm.register(Exiting(), name="exiting")
        with pytest.warns(plugins.PluginWarning, match=r"Plugin 'exiting' failed in register_decoders and is skipped: SystemExit: bye"):
            assert set(BUILTINS) <= set(plugins.get_decoders())


def test_the_cli_survives_a_plugin_that_exits_at_import(tmp_path):
    from typer.testing import CliRunner

    from peftgen.cli import app

    path = write_plugin(tmp_path, "exiting_decoder", "import sys\nsys.exit(0)\n")
    with isolated_plugins():
        result = CliRunner().invoke(app, ["decoders", "--plugin", path])
    assert result.exit_code == 0
    assert "Warning: Plugin" in result.stderr and "SystemExit: 0" in result.stderr
    assert "greedy" in result.stdout


class LateOutOfRange(TokenDecoder):
    """Fine for two steps, then an id past the vocabulary."""

    name = "late-range"

    def select(self, logits, ctx):
        token = logits.shape[-1] + 5 if ctx.step == 2 else 1
        return torch.full(logits.shape[:1], token, dtype=torch.long)


class LateShape(TokenDecoder):
    """Fine for three steps, then one id too many."""

    name = "late-shape"

    def select(self, logits, ctx):
        return torch.ones(logits.shape[0] + (ctx.step == 3), dtype=torch.long)


class LateNegative(TokenDecoder):
    """Fine at first, then -1 for the last row."""

    name = "late-negative"

    def select(self, logits, ctx):
        ids = torch.ones(logits.shape[0], dtype=torch.long)
        ids[-1] = -1 if ctx.step == 4 else 1
        return ids


@pytest.mark.parametrize(
    "decoder, message",
    [
        (LateOutOfRange(), r"^Decoder 'late-range' returned token ids outside \[0, 96\) from select\(\) at step 2; it must return ids"),
        (LateShape(), r"^Decoder 'late-shape' returned a tensor of shape \(4,\) from select\(\) at step 3; it must return a \(3,\) int64"),
        (LateNegative(), r"^Decoder 'late-negative' returned token ids outside \[0, 96\) from select\(\) at step 4"),
    ],
)
def test_select_is_checked_at_every_step_not_only_the_first(decoder, message):
    from peftgen.generation import generate
    from peftgen.testing import tiny_model

    with pytest.raises(PeftgenError, match=message):
        generate(tiny_model(), [[1, 2], [3], [4, 5, 6]], decoder, max_new_tokens=8)


class Typed(TokenDecoder):
    """Its __init__ raises TypeError for a wrong combination; its option converter for odd text."""

    name = "typed"

    def __init__(self, width: int = 1, level: Level = None):
        if width > 5:
            raise TypeError("width above 5 needs a level")
        self.width, self.level = width, level

    def select(self, logits, ctx):
        return logits.argmax(-1)


class Level:
    def __init__(self, text):
        if not text.isdigit():
            raise TypeError(f"a level is digits, not {text!r}")


def test_type_errors_from_a_decoders_init_and_converter_are_clear_errors():
    from peftgen.generation import build_decoder

    with pytest.raises(PeftgenError, match=r"^Decoder 'typed' rejected its options: width above 5 needs a level\. Its options: width"):
        build_decoder(Typed, {"width": "9"})
    with pytest.raises(PeftgenError, match=r"^Option level='high' of decoder 'typed': a level is digits, not 'high'\."):
        build_decoder(Typed, {"level": "high"})
    assert build_decoder(Typed, {"width": "3", "level": "7"}).width == 3


class Pickier(SequenceDecoder):
    """validate() raises TypeError; decode() is never reached."""

    name = "pickier"

    def validate(self, num_return_sequences):
        raise TypeError(f"{num_return_sequences} is not a good number")


class Wrongful(SequenceDecoder):
    """decode() returns what its result option says, instead of Completions."""

    name = "wrongful"

    def __init__(self, result="strings"):
        self.result = result

    def decode(self, engine, num_return_sequences):
        engine.start()
        return {
            "dict": {"a": 1},
            "strings": [["text"] for _ in range(engine.batch_size)],
            "empty": [[] for _ in range(engine.batch_size)],
            "float ids": [[Completion([1.5], "stop")] for _ in range(engine.batch_size)],
            "reason": [[Completion([1], "done")] for _ in range(engine.batch_size)],
            "short": [[engine.completion([1])]],
        }[self.result]


@pytest.mark.parametrize(
    "result, message",
    [
        ("dict", r"^Decoder 'wrongful' returned a dict from decode\(\); it must return one list of Completions per prompt\.$"),
        ("strings", r"^Decoder 'wrongful' returned a str for prompt 0; each result must be a Completion"),
        ("empty", r"^Decoder 'wrongful' returned an empty list for prompt 0; it must return a list of at least one Completion\.$"),
        ("float ids", r"^Decoder 'wrongful' returned a Completion for prompt 0 whose token_ids are not a list of ints\.$"),
        ("reason", r"^Decoder 'wrongful' returned a Completion for prompt 0 with finish_reason 'done'; it must be 'stop' or 'length'\.$"),
        ("short", r"^Decoder 'wrongful' returned results for 1 prompts, expected 2\.$"),
    ],
)
def test_a_sequence_decoder_returning_something_else_than_completions_is_named(result, message):
    from peftgen.generation import generate
    from peftgen.testing import tiny_model

    with pytest.raises(PeftgenError, match=message):
        generate(tiny_model(), [[1, 2], [3]], Wrongful(result), max_new_tokens=4)


def test_a_type_error_from_validate_is_a_clear_error():
    from peftgen.generation import check_request

    with pytest.raises(PeftgenError, match=r"^Decoder 'pickier': 2 is not a good number$"):
        check_request(Pickier(), 2, 10)
