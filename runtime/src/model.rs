//! A loaded model directory: manifest, tokenizer, chat template and the three graph sessions, and the
//! stages of a request built from them (prompt ids, pixel values, image features, embeddings, decoder).

use std::path::{Path, PathBuf};

use image::RgbImage;

use std::time::Duration;

use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::decode::{new_batch, KvBatch, Prefill};
use crate::embed::embed_tokens;
use crate::ep_config::{DecodeOptions, ResolvedLimits};
use crate::error::{Error, Result};
use crate::graph::{Graph, SessionOptions};
use crate::manifest::{
    DecoderFlavour, ImageSettings, Layout, LoadOptions, Manifest, ModelDims, TensorDtype,
};
use crate::minicpmv;
use crate::preprocess::pixel_values;
use crate::splice::splice_image_features;
use crate::tokenizer::TextTokenizer;
use crate::user_text::PlainUserText;
use crate::vision::{encode_batch, ImageBatch};

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
    /// What one request may ask for ([`crate::request::admit`] checks it).
    limits: ResolvedLimits,
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
    flavour: DecoderFlavour,
    layout: Layout,
    /// Prefill chunk and the engine's step budget.
    decode: DecodeOptions,
}

impl Model {
    pub fn load(dir: &Path, options: &ModelOptions) -> Result<Model> {
        let manifest = Manifest::load(dir, options.load)?;
        let (tokenizer, template) = crate::model_dir::load_text(dir, &manifest)?;
        let graphs = &manifest.graphs;
        let session = options.session.for_model(&manifest.model)?;
        let limits = options
            .session
            .ep
            .limits
            .resolve(manifest.model.max_context)?;
        let sessions = Sessions {
            vision: Graph::open(dir, "vision", &graphs.vision, &session)?,
            embed: Graph::open(dir, "embed", &graphs.embed, &session)?,
            decoder: Graph::open(dir, "decoder", &graphs.decoder, &session)?,
            flavour: manifest.decoder_flavour,
            dtype: manifest.float_dtype(),
            dims: manifest.model.clone(),
            image: manifest.image.clone(),
            layout: manifest.layout,
            decode: options.session.ep.decode,
        };
        // Session creation frees its copies of the graphs and weights (see `heap`).
        crate::heap::release_free_heap();
        Ok(Model {
            dir: dir.to_path_buf(),
            manifest,
            tokenizer,
            template,
            sessions,
            limits,
            plain_user_text: None,
        })
    }

    /// The request limits this model was loaded with, resolved against its context.
    pub fn limits(&self) -> &ResolvedLimits {
        &self.limits
    }

    pub fn graphs(&self) -> [&Graph; 3] {
        let s = &self.sessions;
        [&s.vision, &s.embed, &s.decoder]
    }

    /// Chat template -> token ids, with each image's placeholder laid out as the model's layout does.
    ///
    /// LLaVA: each placeholder expands to tokens-per-image image tokens; the image token typed in
    /// message text counts as a placeholder, as in transformers' processor; the number of placeholders
    /// must equal the number of images. MiniCPM-V: [`minicpmv::render_prompt`] (slice grids, which
    /// depend on each image's size). After [`Model::read_special_tokens_as_text`], special tokens
    /// spelled in message text are text in both layouts.
    pub fn prompt_ids(&self, messages: &[ChatMessage], images: &[RgbImage]) -> Result<Vec<u32>> {
        if let Some(layout) = &self.manifest.minicpmv {
            let unk = &self.manifest.image.image_token;
            let ids = self.encode_prompt(messages, &|m: &[ChatMessage]| {
                minicpmv::render_prompt(&self.template, m, images, layout, unk)
            })?;
            // An image-start token typed in the text would misplace every later slice.
            let markers = ids
                .iter()
                .filter(|&&id| id == layout.image_start_token_id)
                .count();
            let slices = minicpmv::slice_count(images, layout);
            if markers != slices {
                return Err(Error::ImageCount {
                    markers,
                    images: slices,
                });
            }
            return Ok(ids);
        }
        let images = images.len();
        let ids =
            self.encode_prompt(messages, &|m: &[ChatMessage]| self.template.render(m, true))?;
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

    /// The messages rendered by `render` and tokenized, with special tokens spelled in message text
    /// read as text when [`Model::read_special_tokens_as_text`] was called.
    fn encode_prompt(
        &self,
        messages: &[ChatMessage],
        render: &dyn Fn(&[ChatMessage]) -> Result<String>,
    ) -> Result<Vec<u32>> {
        let text = render(messages)?;
        match &self.plain_user_text {
            None => self.tokenizer.encode(&text),
            Some(plain) => plain.encode(render, &self.tokenizer, messages, &text),
        }
    }

    /// Preprocessed pixel values of all images (MiniCPM-V: of all their slices), CHW each, in order.
    pub fn pixel_values(&self, images: &[RgbImage]) -> ImageBatch {
        let image = &self.manifest.image;
        if let Some(layout) = &self.manifest.minicpmv {
            return minicpmv::image_batch(images, layout, image.mean, image.std);
        }
        let config = image.preprocess_config();
        let values = images
            .iter()
            .flat_map(|img| pixel_values(img, &config))
            .collect();
        ImageBatch::uniform(values, images.len(), image.height, image.width)
    }

    pub fn max_context(&self) -> usize {
        self.manifest.model.max_context
    }
}

impl Sessions {
    /// Image feature rows (`tokens_per_image` rows of the hidden width per slice; a LLaVA image is
    /// one slice) for the preprocessed images of `count` images.
    pub fn image_features(&self, pixels: &ImageBatch, count: usize) -> Result<Vec<f32>> {
        let (h, w) = (self.image.height, self.image.width);
        let fixed_size = self.layout == Layout::Llava;
        let sizes_ok = !fixed_size || pixels.runs.iter().all(|r| (r.height, r.width) == (h, w));
        if pixels.images != count || pixels.len() != pixels.expected_len() || !sizes_ok {
            return Err(self.vision.error(format!(
                "{} pixel values given for {count} images in {:?} (expected {} images{})",
                pixels.len(),
                pixels.runs,
                pixels.images,
                if fixed_size {
                    format!(" of 3x{h}x{w}")
                } else {
                    String::new()
                }
            )));
        }
        encode_batch(&self.vision, self.dtype, pixels)
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

    /// Runs the prompt through the decoder alone, in one run or in runs of at most
    /// `decode.prefill_chunk` tokens; returns its cache and the last position's logits. `reserve` is
    /// how many positions the caller will append after the prompt (a fused decoder's buffers are sized
    /// to the prompt plus that, within the model's context). The batch engine prefills the same way,
    /// one chunk per iteration.
    pub fn prefill(
        &self,
        embeds: &[f32],
        seq: usize,
        reserve: usize,
        logits: &mut Vec<f32>,
    ) -> Result<SingleSequence> {
        if seq == 0 || !embeds.len().is_multiple_of(seq) {
            return Err(self.decoder.error(format!(
                "{} embedding values do not make {seq} rows",
                embeds.len()
            )));
        }
        let hidden = embeds.len() / seq;
        let chunk = match self.decode.prefill_chunk {
            0 => seq,
            chunk => chunk,
        };
        let mut prefill = Prefill::new(&self.dims, self.dtype);
        for rows in embeds.chunks(chunk * hidden) {
            prefill.run(&self.decoder, rows, rows.len() / hidden, logits)?;
        }
        let mut batch = new_batch(self.flavour, &self.dims, self.dtype);
        batch.push(&self.decoder, prefill.finish()?, reserve)?;
        Ok(SingleSequence { batch })
    }

    /// Feeds one token after the cached positions; leaves its logits in `logits`.
    pub fn step(
        &self,
        token: u32,
        cache: &mut SingleSequence,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let embeds = embed_tokens(&self.embed, &[token])?;
        cache.batch.step(&self.decoder, &embeds, logits)
    }

    /// Most prompt tokens per prefill run (`decode.prefill_chunk`); 0: the whole prompt in one run.
    pub fn prefill_chunk(&self) -> usize {
        self.decode.prefill_chunk
    }

    /// The batch engine's positions per iteration while sequences decode (`decode.step_tokens`);
    /// 0: no budget.
    pub fn step_tokens(&self) -> usize {
        self.decode.step_tokens
    }

    /// The decoder's flavour, which decides the cache layout ([`crate::decode`]).
    pub fn flavour(&self) -> DecoderFlavour {
        self.flavour
    }
}

/// One sequence decoded outside the engine, token by token (reference checks and benchmarks): a batch
/// of one row.
pub struct SingleSequence {
    batch: Box<dyn KvBatch>,
}

impl SingleSequence {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.batch.row_len(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Time inside ONNX Runtime's run during the last step.
    pub fn last_run(&self) -> Duration {
        self.batch.last_run()
    }
}

#[cfg(test)]
mod tests {
    /// A server shares one model between request threads.
    #[test]
    fn a_model_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<super::Model>();
    }
}
