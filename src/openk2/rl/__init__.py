"""openk2.rl: the K1.5/K2 RL stage (`../shared/docs/rl-design.md` §6; `docs/rl.md`)."""
