"""``deconvlab completion bash|zsh``: the script completes commands, options, group=option words, sweeps."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from deconvlab.cli import build_parser, main
from deconvlab.completion import completion_script

SIMULATE = r"""
source "$1"; shift
for line in "$@"; do
  COMP_LINE="$line"; COMP_POINT=${#line}
  read -ra COMP_WORDS <<< "$line"; [[ "$line" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  _deconvlab
  echo "${COMPREPLY[*]}"
done
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("completion") / "deconvlab.bash"
    path.write_text(completion_script(build_parser(), "bash"))
    return path


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_commands_options_config_words_and_sweeps(script):
    lines = ["deconvlab tr", "deconvlab train experiment=quicksta", "deconvlab train --from",
             "deconvlab sweep quickstart_p", "deconvlab train callbacks=early", "deconvlab list sw",
             "deconvlab sweep --dry"]
    done = subprocess.run(["bash", "-c", SIMULATE, "simulate", str(script), *lines], capture_output=True,
                          text=True, check=True)
    assert done.stdout.splitlines() == ["train", "quickstart", "--from-run", "quickstart_pbt", "early_stopping",
                                        "sweeps", "--dry-run"]


def test_the_command_prints_the_script_for_each_shell(capsys):
    assert main(["completion", "zsh"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("autoload -U +X bashcompinit") and "complete -o default -F _deconvlab deconvlab" in out
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, in the CLI's one-line format
        main(["completion", "fish"])
    assert exited.value.code == 2 and capsys.readouterr().err.startswith("error: unknown choice 'fish'")
