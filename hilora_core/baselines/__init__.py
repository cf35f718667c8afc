"""The routing methods HiLoRA is compared with, one module each (see ``hilora_core.policies`` for the table)."""
