"""The curation machinery: documents, the Step API and registry, plans, tasks, executors, reports, audit."""
