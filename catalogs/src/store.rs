//! The lake's object store, with two corrections of what object_store's wrappers return.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// A store that delegates everything to `inner`, except:
/// - `strip`: `PrefixStore` (object_store 0.13) returns `get` and `head` metadata with its
///   prefix still on the location, where listings strip it; a caller that compares the two
///   (DataFusion's listing of a single file) then finds no file. This takes it off.
/// - `sorted`: listings in path order. The Delta kernel takes the order of a `_delta_log/`
///   listing as the order of versions; object stores keep it, a local folder does not.
#[derive(Debug)]
pub(crate) struct LakeStore {
    inner: Arc<dyn ObjectStore>,
    strip: Option<Path>,
    sorted: bool,
}

impl LakeStore {
    pub(crate) fn prefixed(inner: Arc<dyn ObjectStore>, prefix: Path) -> Self {
        Self {
            inner,
            strip: Some(prefix),
            sorted: false,
        }
    }

    pub(crate) fn sorted(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            strip: None,
            sorted: true,
        }
    }

    fn listing(
        &self,
        listing: BoxStream<'static, object_store::Result<ObjectMeta>>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if !self.sorted {
            return listing;
        }
        futures::stream::once(async move {
            let mut all: Vec<ObjectMeta> = listing.try_collect().await?;
            all.sort_by(|a, b| a.location.cmp(&b.location));
            Ok::<_, object_store::Error>(futures::stream::iter(all.into_iter().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }
}

impl std::fmt::Display for LakeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LakeStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for LakeStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let mut result = self.inner.get_opts(location, options).await?;
        if let Some(prefix) = &self.strip {
            let stripped = result
                .meta
                .location
                .prefix_match(prefix)
                .map(Path::from_iter);
            if let Some(rest) = stripped {
                result.meta.location = rest;
            }
        }
        Ok(result)
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.listing(self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.listing(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}
