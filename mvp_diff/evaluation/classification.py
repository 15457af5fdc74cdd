"""Defect-type classification accuracy, as AnomalyDiffusion reports it (sjtuplayer/anomalydiffusion,
train-classification.py): an ImageNet-pretrained ResNet-34 with a new last layer, trained with
cross-entropy and Adam (lr 1e-4, x0.2 at 80% and 90% of the epochs, batch 8, 30 epochs) on the
generated images of each defect type, then tested on the held-out real anomalies. Accuracy of the
last epoch (the reference prints every epoch's; choosing among them would read the test set)."""

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .quality import hub_checkpoint, load_images, require_weights

RESNET34 = ("resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth")


def load_resnet34(num_classes, testing=False):
    """torchvision ResNet-34 with the hub cache's ImageNet weights (testing: random, seeded)."""
    from torchvision.models import resnet34

    torch.manual_seed(0)
    model = resnet34()
    if not testing:
        require_weights(need_is=False, extra=[RESNET34])
        model.load_state_dict(torch.load(hub_checkpoint(RESNET34[0]), map_location="cpu", weights_only=True))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _tensors(files_by_type, types, size):
    images, labels = [], []
    for label, defect in enumerate(types):
        loaded = load_images(files_by_type.get(defect, []), size)
        images.append(loaded)
        labels += [label] * len(loaded)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet normalisation, as torchvision's weights expect
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (torch.cat(images).float() / 255 - mean) / std, torch.tensor(labels)


def classification_accuracy(generated, test, device="cpu", epochs=30, size=256, batch_size=8, seed=0, testing=False):
    """Accuracy on the real test anomalies of a ResNet-34 trained on the generated images.
    `generated` and `test`: {defect type: [image file]}; only types present in both take part."""
    types = sorted(d for d in generated if generated[d] and test.get(d))
    if len(types) < 2:
        return {"accuracy": float("nan"), "types": types, "n_test": 0}
    x_train, y_train = _tensors(generated, types, size)
    x_test, y_test = _tensors(test, types, size)
    model = load_resnet34(len(types), testing).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(epochs * 0.8), int(epochs * 0.9)], gamma=0.2)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for images, labels in loader:
            loss = loss_fn(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(x_test[i : i + 32].to(device)).argmax(1).cpu() for i in range(0, len(x_test), 32)])
    return {"accuracy": float((predicted == y_test).float().mean()), "types": types, "n_test": len(y_test),
            "per_type": {d: float(np.mean((predicted == y_test)[y_test == k].numpy())) for k, d in enumerate(types)}}  # fmt: skip
