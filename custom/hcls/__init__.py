"""What the HCLS trainers share, shipped inside every job (custom/hcls/):

* ``job_config``: the job as NVFlare deployed it (network, key metric, rounds, trainer settings);
* ``site_config``: this site's own configuration (data, privacy policy), never the job's;
* ``components``: optimizers and losses built by name from the trainer settings;
* ``dp_sgd``: record-level DP-SGD with Opacus when the site requires it;
* ``training``: the ``Trainer`` interface every job implements and the one local training loop;
* ``client_loop``: the NVFlare Client API loop that runs a ``Trainer`` at a site.
"""

import logging
import warnings

# MONAI builds its GPU DICOM reader (nvImageCodec) inside every LoadImage once pydicom is installed, and says on
# each one that it falls back to pydicom's own decoders: true on every CPU site, and noise in every site log.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")
