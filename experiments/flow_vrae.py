"""Trains and evaluates the flow-based VRAE; see experiments/configs/flow_vrae.py for variants.

  python experiments/flow_vrae.py --workdir=runs/flow_vrae
"""

import main_lib

if __name__ == "__main__":
  main_lib.run_training("flow_vrae.py")
