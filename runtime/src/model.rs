//! A loaded model directory: manifest, tokenizer, chat template and the three graph sessions, and the
//! stages of a request built from them (prompt ids, pixel values, image features, embeddings, decoder).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::decoder::{decoder_step, StepMode};
use crate::embed::embed_tokens;
use crate::ep_config::DecodeOptions;
use crate::error::{Error, Result};
use crate::graph::{Device, Graph, SessionOptions};
use crate::kv_cache::KvCache;
use crate::manifest::{
    resolve_inside, DecoderFlavour, ImageSettings, LoadOptions, Manifest, ModelDims, TensorDtype,
};
use crate::preprocess::pixel_values;
use crate::splice::splice_image_features;
use crate::tokenizer::TextTokenizer;
use crate::user_text::PlainUserText;
use crate::vision::encode_images;

#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    pub session: SessionOptions,
    pub load: LoadOptions,
}

pub struct Model {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub sessions: Sessions,
    /// Set by [`Model::read_special_tokens_as_text`]: special tokens spelled in message text are text.
    plain_user_text: Option<PlainUserText>,
}

/// The three graph sessions and what running them needs from the manifest. Kept apart from the
/// tokenizer so a decode loop can stream text while it runs the graphs.
pub struct Sessions {
    pub vision: Graph,
    pub embed: Graph,
    pub decoder: Graph,
    dtype: TensorDtype,
    dims: ModelDims,
    image: ImageSettings,
    /// Most prompt tokens per decoder run in prefill; 0: the whole prompt in one run.
    prefill_chunk: usize,
    /// How the decoder runs: a fused decoder appends to shared buffers; a plain one runs bound (the
    /// cache stays in the decoder's device memory) on CUDA and TensorRT, and on the CPU when
    /// `decode.io_binding` asks for it.
    decoder_mode: StepMode,
}

impl Model {
    pub fn load(dir: &Path, options: &ModelOptions) -> Result<Model> {
        let manifest = Manifest::load(dir, options.load)?;
        let tokenizer =
            TextTokenizer::from_file(&resolve_inside(dir, &manifest.text.tokenizer_file)?)?;
        if tokenizer.vocab_size() > manifest.model.vocab_size {
            return Err(Error::Model {
                dir: dir.to_path_buf(),
                reason: format!(
                    "the tokenizer has {} tokens but the model's vocabulary is {}",
                    tokenizer.vocab_size(),
                    manifest.model.vocab_size
                ),
            });
        }
        let image_token = &manifest.image.image_token;
        if tokenizer.token_to_id(image_token) != Some(manifest.image.image_token_id) {
            return Err(Error::Model {
                dir: dir.to_path_buf(),
                reason: format!(
                    "the tokenizer maps {image_token:?} to {:?}, the manifest says {}",
                    tokenizer.token_to_id(image_token),
                    manifest.image.image_token_id
                ),
            });
        }
        let template = ChatTemplate::new(
            &manifest.text.chat_template,
            &manifest.text.bos_token,
            &manifest.text.eos_token,
        )?;
        let graphs = &manifest.graphs;
        let session = options.session.for_model(&manifest.model)?;
        let decoder = Graph::open(dir, "decoder", &graphs.decoder, &session)?;
        let decoder_mode = step_mode(
            manifest.decoder_flavour,
            options.session.ep.decode.io_binding,
            decoder.device,
        );
        let sessions = Sessions {
            vision: Graph::open(dir, "vision", &graphs.vision, &session)?,
            embed: Graph::open(dir, "embed", &graphs.embed, &session)?,
            decoder,
            decoder_mode,
            dtype: manifest.float_dtype(),
            dims: manifest.model.clone(),
            image: manifest.image.clone(),
            prefill_chunk: options.session.ep.limits.prefill_chunk,
        };
        // Session creation frees its copies of the graphs and weights (see `heap`).
        crate::heap::release_free_heap();
        Ok(Model {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
            template,
            sessions,
            plain_user_text: None,
        })
    }

    pub fn graphs(&self) -> [&Graph; 3] {
        let s = &self.sessions;
        [&s.vision, &s.embed, &s.decoder]
    }

    /// Chat template -> token ids, with each image placeholder expanded to tokens-per-image image tokens.
    ///
    /// The image token typed in message text counts as a placeholder, as in transformers' processor
    /// (unless [`Model::read_special_tokens_as_text`] was called); the number of placeholders must
    /// equal `images`.
    pub fn prompt_ids(&self, messages: &[ChatMessage], images: usize) -> Result<Vec<u32>> {
        let text = self.template.render(messages, true)?;
        let ids = match &self.plain_user_text {
            None => self.tokenizer.encode(&text)?,
            Some(plain) => plain.encode(&self.template, &self.tokenizer, messages, &text)?,
        };
        let image = &self.manifest.image;
        let markers = ids.iter().filter(|&&id| id == image.image_token_id).count();
        if markers != images {
            return Err(Error::ImageCount { markers, images });
        }
        let mut expanded = Vec::with_capacity(ids.len() + markers * image.tokens_per_image);
        for id in ids {
            if id == image.image_token_id {
                expanded.extend(std::iter::repeat_n(id, image.tokens_per_image));
            } else {
                expanded.push(id);
            }
        }
        Ok(expanded)
    }

    /// From now on, special tokens (and the image token) spelled in message text are tokenized as
    /// plain text; the template's own stay special (`user_text`). Costs a second copy of the tokenizer.
    pub fn read_special_tokens_as_text(&mut self) {
        self.plain_user_text = Some(PlainUserText::new(&self.tokenizer));
    }

    /// Preprocessed pixel values of all images, CHW each, concatenated.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Vec<f32> {
        let config = self.manifest.image.preprocess_config();
        images
            .iter()
            .flat_map(|img| pixel_values(img, &config))
            .collect()
    }

    pub fn max_context(&self) -> usize {
        self.manifest.model.max_context
    }
}

impl Sessions {
    /// Image feature rows (`count * tokens_per_image` rows of the hidden width) for preprocessed images.
    pub fn image_features(&self, pixel_values: &[f32], count: usize) -> Result<Vec<f32>> {
        let dtype = self.dtype;
        let (h, w) = (self.image.height, self.image.width);
        let expected = count * 3 * h as usize * w as usize;
        if pixel_values.len() != expected {
            return Err(self.vision.error(format!(
                "{} pixel values given for {count} images of 3x{h}x{w}",
                pixel_values.len()
            )));
        }
        encode_images(&self.vision, dtype, pixel_values, count, h, w)
    }

    /// Token embeddings with the image features spliced into the image-token rows.
    pub fn prompt_embeddings(&self, ids: &[u32], features: &[f32]) -> Result<Vec<f32>> {
        let mut embeds = embed_tokens(&self.embed, ids)?;
        splice_image_features(
            &mut embeds,
            self.dims.hidden_size,
            ids,
            self.image.image_token_id,
            features,
        )?;
        Ok(embeds)
    }

    /// Runs the prompt through the decoder, in one run or in runs of at most `limits.prefill_chunk`
    /// tokens; returns the cache and the last position's logits. `reserve` is how many positions the
    /// caller will append after the prompt: shared buffers are sized to the prompt plus that (within
    /// the model's context), so decoding never reallocates them.
    pub fn prefill(
        &self,
        embeds: &[f32],
        seq: usize,
        reserve: usize,
        logits: &mut Vec<f32>,
    ) -> Result<KvCache> {
        let dtype = self.dtype;
        let mut cache = if self.decoder_mode == StepMode::Shared {
            let capacity = seq
                .saturating_add(reserve)
                .min(self.dims.max_context)
                .max(seq);
            KvCache::shared(&self.dims, dtype, capacity, &self.decoder.allocator()?)?
        } else {
            KvCache::empty(&self.dims, dtype)?
        };
        if seq == 0 || !embeds.len().is_multiple_of(seq) {
            return Err(self.decoder.error(format!(
                "{} embedding values do not make {seq} rows",
                embeds.len()
            )));
        }
        let hidden = embeds.len() / seq;
        let chunk = if self.prefill_chunk == 0 {
            seq
        } else {
            self.prefill_chunk
        };
        for rows in embeds.chunks(chunk * hidden) {
            decoder_step(
                &self.decoder,
                dtype,
                self.decoder_mode,
                rows,
                rows.len() / hidden,
                &mut cache,
                logits,
            )?;
        }
        Ok(cache)
    }

    /// Feeds one token after the cached positions; leaves its logits in `logits`.
    pub fn step(&self, token: u32, cache: &mut KvCache, logits: &mut Vec<f32>) -> Result<()> {
        let dtype = self.dtype;
        let embeds = embed_tokens(&self.embed, &[token])?;
        decoder_step(
            &self.decoder,
            dtype,
            self.decoder_mode,
            &embeds,
            1,
            cache,
            logits,
        )
    }

    /// How the decoder runs: [`StepMode::Bound`] keeps the KV cache in the decoder's device memory,
    /// [`StepMode::Shared`] appends to it in place.
    pub fn decoder_mode(&self) -> StepMode {
        self.decoder_mode
    }
}

/// The decoder's step mode: a fused decoder appends in place to shared buffers unless
/// `decode.io_binding=false` asks for plain runs (the fused graph also returns a new present when
/// given a past of exactly its length); a plain decoder runs bound on a GPU, or as asked.
fn step_mode(flavour: DecoderFlavour, io_binding: Option<bool>, device: Device) -> StepMode {
    if flavour == DecoderFlavour::Fused && io_binding != Some(false) {
        return StepMode::Shared;
    }
    if (DecodeOptions { io_binding }).io_binding_on(device != Device::Cpu) {
        StepMode::Bound
    } else {
        StepMode::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_decoders_share_buffers_unless_plain_runs_are_asked_for() {
        let cuda = Device::Cuda { device_id: 0 };
        for device in [Device::Cpu, cuda] {
            for io_binding in [None, Some(true)] {
                assert_eq!(
                    step_mode(DecoderFlavour::Fused, io_binding, device),
                    StepMode::Shared
                );
            }
            assert_eq!(
                step_mode(DecoderFlavour::Fused, Some(false), device),
                StepMode::Plain
            );
        }
        assert_eq!(
            step_mode(DecoderFlavour::Plain, None, Device::Cpu),
            StepMode::Plain
        );
        assert_eq!(
            step_mode(DecoderFlavour::Plain, None, cuda),
            StepMode::Bound
        );
        assert_eq!(
            step_mode(DecoderFlavour::Plain, Some(true), Device::Cpu),
            StepMode::Bound
        );
    }

    /// A server shares one model between request threads.
    #[test]
    fn a_model_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Model>();
    }
}
