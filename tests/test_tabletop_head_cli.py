"""Head training and evaluation on the generated scenes (tabletop/head_cli.py), over the core's tools."""
import json

import pytest

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.training import evaluate, train
from flmm_ros.tabletop import head_cli
from flmm_ros.tabletop.samples import tabletop_samples


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("bundle")))


def test_evaluate_scores_test_scenes_by_case(bundle, capsys):
    scores = head_cli.evaluate_main(["--model", bundle, "--count", "2", "--by-case", "--json"])
    assert json.loads(capsys.readouterr().out) == scores
    pipe = GroundingPipeline.from_config(PipelineConfig(model=bundle, answer=False))
    expected = evaluate.evaluate(pipe, tabletop_samples("test", 2, expression="first"), by_case=True)
    assert scores == expected and any(" | " in k for k in scores)


def test_train_uses_the_tabletop_recipe_and_writes_a_resumable_checkpoint(bundle, tmp_path, capsys):
    argv = ["--lmm", bundle, "--train-count", "1", "--val-count", "1", "--epochs", "1", "--out", str(tmp_path)]
    final = head_cli.train_main(argv)
    assert "recipe tabletop: targets image, amp None, loss averaged over masks" in capsys.readouterr().out
    assert final["step"] == 1
    assert {p.name for p in tmp_path.iterdir()} == {train.HEAD_FILE, train.STATE_FILE, train.LOG_FILE}
    assert head_cli.train_main([*argv[:-4], "--epochs", "2", "--out", str(tmp_path)])["step"] == 2
    assert "resumed at step 1/2" in capsys.readouterr().out


def test_the_cores_tools_point_tabletop_data_to_this_front_end(bundle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", bundle, "--data", "tabletop"])
    assert exit_info.value.code == 2 and "flmm_ros.tabletop.head_cli evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--lmm", bundle, "--out", str(tmp_path), "--data", "tabletop"])
    assert exit_info.value.code == 2 and "flmm_ros.tabletop.head_cli train" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="usage: python -m flmm_ros.tabletop.head_cli {train,evaluate}"):
        head_cli.main(["fit"])
