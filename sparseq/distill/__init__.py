"""Knowledge distillation from a dense teacher into a compressed student."""
