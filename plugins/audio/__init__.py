"""The audio modality: spectrogram tokenizers; audio manifests, the generated spoken digits and the
real speech sample; waveform and spectrogram transforms; ``modality=audio`` is its config."""

from ...tokenizers.audio import SpectrogramFrameTokenizer, SpectrogramPatchTokenizer
from .. import hookimpl
from ..environment import package_status
from . import data, real_speech, transforms


@hookimpl
def register_tokenizers():
    return {"spectrogram_patch": SpectrogramPatchTokenizer, "spectrogram_frames": SpectrogramFrameTokenizer}


@hookimpl
def register_datasets():
    return {"audio_manifest": data.AudioManifestDataset, "spoken_digits": data.SpokenDigitsDataset,
            "speech_sample": real_speech.SpeechSampleDataset}


@hookimpl
def register_transforms():
    return {"random_crop_audio": transforms.RandomCropAudio, "random_gain": transforms.RandomGain,
            "time_mask": transforms.TimeMask, "freq_mask": transforms.FreqMask, "add_noise": transforms.AddNoise}


@hookimpl
def report_environment():
    return {"torchaudio": package_status("torchaudio", "torchaudio"),
            "soundfile": package_status("soundfile", "soundfile")}
