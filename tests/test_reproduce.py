"""scripts/reproduce.py: the seeds' pipelines in one command (dry runs of every full recipe,
--quick runs end to end, a kill and a resume, bad input)."""
import json
import signal
import subprocess
import sys

import pytest

from studies import recipes
from cli import reproduce
from helpers import ENV, ROOT


def dry(capsys, *argv):
    assert reproduce.main(["--dry_run", *map(str, argv)]) == 0
    return capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.parametrize("name, needles", [
    ("pfec_resnet56", ["--model resnet56", "--epochs 300 --sched multistep --decay_epochs 150 225",
                       "--weight_decay 1e-4", "--batch_size 128 --lr 0.1", "--opt sgd",
                       "--epochs 40 --sched multistep --decay_epochs 20 30",
                       "--criterion l1 --group_ratio 'layer1.*=0.1' 'layer2.*=0.2' 'layer3.*=0.3' layer1.7=0 "
                       "layer2.0=0 layer3.0=0 layer3.8=0"]),
    ("pfec_resnet110", ["--model resnet110", "layer1.17=0 layer2.0=0 layer3.0=0"]),
    ("pfec_vgg16", ["--model vgg16_cifar", "conv1_1=0.25 'conv4_*=0.25' 'conv5_*=0.25'"]),
    ("pfec_resnet56_iterative_e15", ["round5_pruned.pth", "--kd_alpha 1 --kd_temperature 5",
                                     "--teacher", "# top-1 of the mean softmax of round1, round2, round3, round4, round5"]),
    ("slimming_vgg19", ["--model vgg19_bn_cifar", "--epochs 160 --sched multistep --decay_epochs 80 120",
                        "--batch_size 64 --lr 0.1", "--sparsity 1e-4", "--criterion slimming --ratio 0.7 --normalize none"]),
    ("efficient_convnext_t", ["--model convnext_tiny_unpruned_cifar10 --finetune " + recipes.OFFICIAL_TINY_1K,
                              "--layer_decay 0.8", "--criterion opnorm --dims 96 192 384 576",
                              "--dims 32 64 128 256", "--input_size 224"]),
])
def test_dry_run_prints_the_seed_hyper_parameters(capsys, tmp_path, name, needles):
    out = dry(capsys, "--recipe", name, "--data_set", "CIFAR10", "--data_path", tmp_path, "--output_dir", tmp_path / "x")
    for needle in needles:
        assert needle in out, (needle, out)
    assert not (tmp_path / "x").exists()  # a dry run writes nothing


@pytest.mark.e2e
def test_gpus_run_training_under_torchrun_with_the_seed_batch_split(capsys, tmp_path):
    out = dry(capsys, "--recipe", "pfec_resnet56", "--data_set", "CIFAR100", "--data_path", tmp_path,
              "--output_dir", tmp_path / "x", "--gpus", 4)
    train = [line for line in out.splitlines() if "main.py --epochs" in line]
    assert len(train) == 2 and all("torch.distributed.run --standalone --nproc_per_node 4" in t
                                   and "--batch_size 32 " in t for t in train)
    assert "prune.py" in out and "--nproc_per_node" not in [line for line in out.splitlines() if "prune.py" in line][0]


@pytest.mark.e2e
@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "pfec_resnet56", "--output_dir", "x"], "--data_set is required"),
    (["--recipe", "pfec_resnet56", "--quick", "--data_set", "CIFAR10", "--output_dir", "x"], "--quick runs on"),
    (["--recipe", "pfec_resnet56", "--data_set", "CIFAR10", "--output_dir", "x"], "needs --data_path"),
    (["--recipe", "pfec_resnet56", "--quick", "--gpus", "3", "--output_dir", "x", "--dry_run"], "does not divide"),
    (["--recipe", "pfec_resnet56", "--quick", "--pretrained", "w.pth", "--output_dir", "x"], "--pretrained applies"),
    (["--recipe", "pfec_resnet56", "--quick", "--gpus", "0", "--output_dir", "x"], "--gpus must be >= 1"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
    assert reproduce.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1], err


def _rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_quick_pfec_killed_after_a_step_resumes_and_prints_the_seed_table(tmp_path):
    out = tmp_path / "r56"
    cmd = [sys.executable, str(ROOT / "scripts/reproduce.py"), "--recipe", "pfec_resnet56", "--quick",
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("[2/3] pruned (prune): started"):
            proc.send_signal(signal.SIGKILL)  # while the pruning step runs
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and [r["step"] for r in _rows(out)] == ["baseline"]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[1/3]" not in done.stdout and "[2/3] pruned: top-1" in done.stdout and "ETA about" in done.stdout
    rows = _rows(out)
    assert [r["step"] for r in rows] == ["baseline", "pruned", "finetuned"]
    assert rows[0]["params"] == 853_018 and rows[1]["params"] == rows[2]["params"] < 700_000
    table = done.stdout[done.stdout.index("| Pruning Filters"):].splitlines()
    assert table[2].startswith("| ResNet-56 | 1 | 0.85M |") and table[2].endswith("| 0.85M | 93.42 |")
    assert table[4].startswith("| ResNet-56 #1 (pruned, fine-tuned) | 1 | 0.65M |") and table[4].endswith("| 0.65M | 93.05 |")
    assert "--quick: 1-epoch steps" in done.stdout and "says little" in done.stdout
    assert "--finetune " + str(out / "pruned.pth") in (out / "logs/finetuned.log").read_text()


@pytest.mark.e2e
def test_quick_slimming_end_to_end(tmp_path, capsys):
    out = tmp_path / "slim"
    assert reproduce.main(["--recipe", "slimming_vgg19", "--quick", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["step"]: r for r in _rows(out)}
    assert list(rows) == ["baseline", "sparsity", "pruned", "finetuned"]
    assert rows["baseline"]["params"] == rows["sparsity"]["params"] == 20_035_018
    assert rows["pruned"]["params"] == rows["finetuned"]["params"] < 0.3 * 20_035_018
    assert "--sparsity 1e-4" in (out / "logs/sparsity.log").read_text()
    assert "| pruned 0.7, not fine-tuned | - |" in printed and "| 2.42M | 10.00 |" in printed
    # the same command again finds every step done; another recipe in the folder is refused
    assert reproduce.main(["--recipe", "slimming_vgg19", "--quick", "--output_dir", str(out)]) == 0
    assert "started" not in capsys.readouterr().out
    assert reproduce.main(["--recipe", "pfec_vgg16", "--quick", "--output_dir", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_full_recipe_passes_the_tools_own_checks_and_its_rules_fit_its_model(name, tmp_path):
    """Each main.py step parses and passes main.py's checks; each prune step's rule prunes the
    model its source step trains (random weights of that shape)."""
    import main
    import models
    from cli import options
    import pruning
    from cli import prune as cli
    recipe = recipes.recipe(name, "CIFAR10")
    pipe = recipes.Pipeline(recipe, "CIFAR10", str(tmp_path), str(tmp_path / "run"))
    arch_of = {}
    for step in recipe.steps:
        if step.kind == "train":
            argv = pipe.commands(step)[0][2:]
            args = main.parse_args([a for a in argv if a != recipes.OFFICIAL_TINY_1K and a != "--finetune"]
                                   if "--model" in argv else argv)
            options.check_ranges(args)
            options.check_combinations(args)
            arch_of[step.name] = models.default_arch(args.model) if args.model else arch_of[step.source]
        elif step.kind == "prune":
            spec = cli.spec_from_args(cli.get_args_parser().parse_args(["--checkpoint", "x", *step.argv]))
            spec.resolved()
            if spec.criterion == "opnorm":  # its rule (--dims) fits the same with a cheaper score
                spec = cli.spec_from_args(cli.get_args_parser().parse_args(
                    ["--checkpoint", "x", *step.argv[2:], "--criterion", "l1"]))
            model = models.build_model(arch_of[step.source])
            arch_of[step.name] = pruning.prune(model, spec).checkpoint["arch"]
    assert arch_of  # at least one model was checked
