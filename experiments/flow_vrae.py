"""Trains and evaluates the flow-based VRAE; see experiments/configs/flow_vrae.py for variants.

  python experiments/flow_vrae.py --workdir=runs/flow_vrae
"""

import main_lib

define_flags = main_lib.training_flags("flow_vrae.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
