"""Server-side continuation of jobs that a server crash interrupted, shipped by deployment into the server's
``<workspace>/local/custom`` (NVFlare puts that folder on the server's python path) and installed by the
server's ``local/resources.json``; never inside a job.

* ``recovery``: ``JobRecovery``, the server component that runs such a job again under its own job id over the
  workspace it had (global model, best model, round record), where the job's ``hcls.fedavg`` code continues it.
"""
