"""Bad input to `foundry` is one line on stderr, exit code 2, no traceback, and nothing half-written."""
import pytest

from conftest import foundry, foundry_here


def assert_one_line_error(res, expected):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert 'Traceback' not in res.stderr
    assert lines[0].startswith('foundry: error:') and expected in lines[0], lines[0]


@pytest.mark.parametrize('yaml_text,overrides,expected', [
    (None, [], 'config file not found'),
    ('training: [1, 2\n', [], 'invalid YAML'),
    ('training:\n  learning_rate: -1\n', [], 'training.learning_rate: Input should be greater than 0 (got -1)'),
    ('model:\n  layerz: 2\n', [], 'model.layerz: unknown key'),
    ('experiment_name: x\n', ['--set', 'training.warmup=3'], "unknown config key 'training.warmup'"),
    ('experiment_name: x\n', ['--set', 'model.layers=many'], 'model.layers: Input should be a valid integer'),
    ('data:\n  source_corpus: /nonexistent/corpus.txt\n', [], 'no such file or directory: /nonexistent/corpus.txt'),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, cache_dir, yaml_text, overrides, expected):
    cfg = tmp_path/'exp.yaml'
    if yaml_text is not None: cfg.write_text(yaml_text)
    run_dir = tmp_path/'run'
    res = foundry_here('train', cfg, '--run-dir', run_dir, *overrides)
    assert_one_line_error(res, expected)
    assert not run_dir.exists()


def test_generate_from_missing_source_exits_2(tmp_path):
    assert_one_line_error(foundry('generate', tmp_path/'nope', '--prompt', 'x'), 'no such run or model directory')


def test_eval_of_a_directory_that_is_not_a_run_exits_2(tmp_path):
    assert_one_line_error(foundry('eval', tmp_path), 'not a run directory')


def test_unknown_subcommand_exits_2():
    assert_one_line_error(foundry('fly'), 'invalid choice')


@pytest.mark.parametrize('suite_text,expected', [
    ("name: s\nprompts:\n  - {name: a, language: python, prompt: x, must_match: ['(oops']}\n", "prompts.0.must_match: item 0: invalid regex '(oops'"),
    ("name: s\nprompts:\n  - {name: a, prompt: x}\n", 'prompts.0.language: Field required'),
    ("name: s\nprompts: []\n", 'prompts: List should have at least 1 item'),
])
def test_bad_suite_file_is_rejected_with_the_field_named(tmp_path, suite_text, expected):
    from model_foundry.config import ExperimentConfig, save_config
    save_config(ExperimentConfig(), tmp_path/'run'/'config.yaml')  # a run directory; the suite is checked before any work
    (tmp_path/'suite.yaml').write_text(suite_text)
    assert_one_line_error(foundry_here('eval', tmp_path/'run', '--suite', tmp_path/'suite.yaml'), expected)
    assert not (tmp_path/'run'/'report').exists()
