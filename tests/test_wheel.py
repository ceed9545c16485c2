"""The package as a user installs it: a wheel built from this tree carries the zoo, and works from anywhere."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_carries_the_zoo_and_loads_it_offline(tmp_path):
    """Build a wheel, install it (without dependencies: they are this environment's) into a fresh folder, and import
    it from another directory with neither the clone nor MINILLAVA_DATA in sight: every zoo component loads."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("minillava-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, cwd=tmp_path)
    script = textwrap.dedent("""
        import minillava as ml, numpy, pathlib, sys
        from minillava.data import shapesworld as sw
        here = pathlib.Path(ml.__file__).resolve()
        assert here.is_relative_to(pathlib.Path(sys.argv[1]).resolve()), here  # the installed copy, not the clone
        assert ml.zoo.data_dir() == here.parent / "zoo_data", ml.zoo.data_dir()
        clip, tok, ip = ml.load_clip("tiny-clip")
        lm, tok = ml.load_lm("tiny-lm")
        for name in ("tiny-llava-stage1", "tiny-llava"):
            model, processor = ml.load(name)
            image = sw.render(sw.sample_scene(numpy.random.default_rng(0)))
            batch = processor([{"role": "user", "content": "<image>\\nWhat color is the circle?"}], [image],
                              add_generation_prompt=True)
            assert model.generate(batch["input_ids"], batch["attention_mask"], batch["images"],
                                  max_new_tokens=2).shape == (1, 2) or name.endswith("stage1")
        import minillava.tools.bench, minillava.cli  # the tooling and the command line come along
        print("ok", ml.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("MINILLAVA_DATA", "PYTHONPATH")}
    env.update(PYTHONPATH=str(tmp_path / "site"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("ok")
    assert "Loading weights" not in out.stderr  # loading prints no transformers progress bar
