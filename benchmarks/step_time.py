"""Step time of the trainer against the bare model step; a thin wrapper over `lorakit bench`.

    python benchmarks/step_time.py --size tiny --resolution 64 --batch 2
    python benchmarks/step_time.py --size sd15 --resolution 256 --batch 1 --gradient_checkpointing
"""

from lorakit.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
