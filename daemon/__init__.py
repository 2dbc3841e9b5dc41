"""dropmesh's service: ledger, inbox watcher, scheduler, worker processes, CLI."""
