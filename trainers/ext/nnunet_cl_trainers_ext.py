# nnUNet_extTrainer points at this folder (`nnUNetv2_cl_ext_trainer_path` prints it). nnU-Net imports every
# module here and later drops them from sys.modules; this shim only re-exports the trainers from the installed
# package, so the classes keep their real module and stay picklable for nnU-Net's data augmentation workers.
from nnunet_cl_trainers import *  # noqa: F401,F403
