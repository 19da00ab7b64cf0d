"""The config block of every script survives the first edits a forker makes in a copy: blank lines, a comment
paragraph and new constants inside it; every constant stays a flag, in -h and on the command line. The plumbing
block below each image script's banner is one text, and so is the MNIST judge; no script imports a sibling."""
import importlib.util
import os
import re

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['ddpm_1d', 'ddpm_points', 'ddpm_mnist', 'ddpm_cifar', 'score_sde', 'gan_baseline']


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_flags(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.get_config(['-h'])
    assert e.value.code == 0
    return set(re.findall(r'--[a-z0-9][a-z0-9-]*', capsys.readouterr().out))


@pytest.mark.parametrize('name', SCRIPTS)
def test_config_block_survives_blank_lines_comments_and_new_constants(name, tmp_path, capsys):
    src = open(os.path.join(HERE, f'{name}.py')).read()
    head, block = src.split('# ---- config ----\n', 1)
    first = block.index('\n') + 1  # after the first constant: a blank line and a comment paragraph
    end = block.index('\n\n')  # after the last one: a blank line, then a new constant
    edited = (head + '# ---- config ----\n' + block[:first] + '\n# a comment paragraph,\n# over two lines\n\n'
              + block[first:end] + "\n\nwarmup_frac = 0.5            # a constant a forker added\n" + block[end:])
    (tmp_path / f'{name}.py').write_text(edited)
    original, copy = load(os.path.join(HERE, f'{name}.py'), f'{name}_original'), load(tmp_path / f'{name}.py', name)
    before, after = help_flags(original, capsys), help_flags(copy, capsys)
    assert after == before | {'--warmup-frac'}, after ^ before
    last = re.findall(r'^([a-z_][a-z0-9_]*) *=', block[:end], re.M)[-1]  # the constant right before the new one
    c = copy.get_config(['--warmup-frac', '0.25', '--' + last.replace('_', '-'), str(getattr(copy, last))])
    assert c['warmup_frac'] == 0.25 and c[last] == getattr(copy, last)


IMAGE_SCRIPTS = ['ddpm_mnist', 'ddpm_cifar', 'score_sde', 'gan_baseline']


def section(name, banner):
    """The text of name.py from its line starting with banner to the next '# ----' banner (or the main guard)."""
    src = open(os.path.join(HERE, f'{name}.py')).read()
    assert src.count('\n' + banner) == 1, (name, banner)
    return re.split(r'\n# ----|\nif __name__ ==', src.split('\n' + banner, 1)[1])[0]


def test_the_plumbing_block_is_byte_identical_in_the_four_image_scripts():
    blocks = {name: section(name, '# ---- plumbing: ') for name in IMAGE_SCRIPTS}
    assert len(blocks['ddpm_cifar']) > 5000
    for name, block in blocks.items():
        assert block == blocks['ddpm_cifar'], f'{name}.py has drifted from ddpm_cifar.py below its plumbing banner'


def test_the_mnist_judge_is_byte_identical_in_the_three_mnist_scripts():
    judges = {name: section(name, '# ---- the MNIST judge: ') for name in ('ddpm_mnist', 'score_sde', 'gan_baseline')}
    assert len(judges['ddpm_mnist']) > 2000 and 'MNIST judge' not in open(os.path.join(HERE, 'ddpm_cifar.py')).read()
    for name, judge in judges.items():
        assert judge == judges['ddpm_mnist'], f'{name}.py has drifted from ddpm_mnist.py in the MNIST judge'


@pytest.mark.parametrize('name', SCRIPTS)
def test_a_script_imports_no_sibling_so_a_copy_runs_alone(name):
    """A user copies one file: it may import the standard library, numpy, torch and their kin, never another
    script of this repository."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, f'{name}.py')).read())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & set(SCRIPTS), imported & set(SCRIPTS)


@pytest.mark.parametrize('name', SCRIPTS)
def test_every_choice_flag_refuses_a_value_outside_its_list(name, capsys):
    """A constant whose comment lists its values ('a' | 'b', anywhere in the comment) is a flag that takes only
    those: an unknown value is argparse's one usage error (exit 2) naming the choices, never a silent default."""
    module = load(os.path.join(HERE, f'{name}.py'), name)
    block = open(os.path.join(HERE, f'{name}.py')).read().split('# ---- config ----\n')[1].split('\n# ----')[0]
    listed = re.findall(r"^([a-z_][a-z0-9_]*) *=.*#.*?'[^']*' *\| *'", block, re.M)
    assert listed
    for key in listed:
        flag = '--' + key.replace('_', '-')
        with pytest.raises(SystemExit) as e:
            module.get_config([flag, 'no-such-choice'])
        assert e.value.code == 2, flag
        assert f"argument {flag}: invalid choice: 'no-such-choice'" in capsys.readouterr().err, flag
