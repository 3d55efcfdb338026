"""Site-side enforcement of a hospital's privacy policy, shipped by deployment into each site's
``<workspace>/local/custom`` (NVFlare puts that folder on the site's python path), never with a job.

* ``policy``: the policy as rendered from ``site_configs/<site>/local_config.json`` ``privacy`` into the
  site's NVFlare privacy scope (``local/privacy.json``), checked field by field;
* ``dataset``: what the site counts and knows from its own data manifests (training samples,
  the values of blocked identifier fields);
* ``identifiers``: the site's identifier values matched however written (case, punctuation, prefix, word order,
  date format, numbers, character codes);
* ``outgoing``: the check of anything about to leave the site (blocked field names and values, DP accounting);
* ``structure``: the structure a result may have (the global model's parameters, allowed metrics as finite
  numbers, allowed meta keys with numeric values, no free text);
* ``components``: the NVFlare components the scope installs: ``SitePolicyFilter`` (task results)
  and ``OutgoingEventGuard`` (events streamed to the server, e.g. metrics).
* ``approval``: the job code the site approved (``local/approved_jobs.json``, by digest of the job's app):
  ``ApprovingAppDeployer``, the site's ``app_deployer`` (``local/resources.json``), refuses any other job before
  it runs, and the approved name is the job's identity for the checks above.
"""
