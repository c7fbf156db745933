"""Loss-level methods: each needs only the task losses (and its own history); cost: one backward."""
