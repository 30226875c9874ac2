"""Trains and evaluates the conditional VRAE on DailyDialog; see
experiments/configs/cvrae_dialogue.py for the variants.

  python experiments/cvrae_dialogue.py --workdir=runs/dd_cvae
  python experiments/cvrae_dialogue.py --config=experiments/configs/cvrae_dialogue.py:seq2seq \
      --workdir=runs/dd_seq2seq
"""

import main_lib

define_flags = main_lib.training_flags("cvrae_dialogue.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
