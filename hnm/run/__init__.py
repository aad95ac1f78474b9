"""Running a plan: the phase driver (`driver`), where its tasks run — this machine's
worker processes (`pool`) or torchrun's ranks (`distributed`) — and one task inside one
process (`worker`)."""
